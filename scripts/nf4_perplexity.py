"""Perplexity of SmolLM2-135M-Instruct on GPL-3 text: bf16 vs the engine's NF4+DQ vs transformers +
bitsandbytes NF4+DQ, and the engine loading bitsandbytes' own 4-bit bytes.

    python scripts/nf4_perplexity.py [--model DIR] [--text FILE] [--window 512]

All models run in train mode (no dropout in this model): bitsandbytes' CPU eval mode repacks the
weights and changes results (see the format notes), so train mode is the comparable reference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bf16 checkpoint dir (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    a = ap.parse_args()

    import transformers

    from qlora_engine import load_model, resolve_model
    from qlora_engine.train.evaluate import perplexity, token_windows

    model_dir = resolve_model(a.model or "SmolLM2-135M-Instruct")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tok, Path(a.text).read_text(), a.window, a.max_windows)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    rows = []

    def run(name, build):
        t0 = time.perf_counter()
        model = build().train()
        r = perplexity(model, windows)
        rows.append((name, r["ppl"], r["nll"], time.perf_counter() - t0))
        return model

    run("bf16 (transformers)", lambda: transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    run("NF4+DQ engine (quantized by the engine)", lambda: load_model(model_dir))
    bnb = run("NF4+DQ transformers + bitsandbytes", lambda: transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_cfg, dtype=torch.bfloat16, device_map="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        bnb.save_pretrained(tmp)
        run("NF4+DQ engine (loading bitsandbytes' 4-bit bytes)", lambda: load_model(tmp))

    print(f"\n{model_dir.name} on {a.text}: {windows.shape[0]} windows x {a.window} tokens, torch {torch.__version__}")
    print(f"| model | perplexity | mean NLL | seconds |\n|---|---|---|---|")
    for name, ppl, nll, sec in rows:
        print(f"| {name} | {ppl:.4f} | {nll:.5f} | {sec:.1f} |")
    ref = rows[2][1]
    print(f"\nengine-quantized vs bitsandbytes: {100 * (rows[1][1] - ref) / ref:+.3f}% "
          f"(double-quant codes differ where bnb's CPU lookup table is not nearest)")
    print(f"engine on bnb bytes vs bitsandbytes: {100 * (rows[3][1] - ref) / ref:+.5f}%")


if __name__ == "__main__":
    main()
