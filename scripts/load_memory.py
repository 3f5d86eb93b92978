"""Peak host memory while loading a checkpoint into 4-bit NF4 (double quantization), on the CPU:
the engine's streaming loader vs `transformers.AutoModelForCausalLM.from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`, same checkpoint, same run.

    python scripts/load_memory.py                  # the cached SmolLM2-135M-Instruct (bf16)
    python scripts/load_memory.py --model DIR

Each load runs in its own subprocess (`machine.child_peak_rss`: peak resident set, VmHWM); a third subprocess
imports torch, transformers, bitsandbytes and this package and builds the empty (meta) model: the
baseline both are measured against.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers, bitsandbytes
from qlora_engine.models import hub, loader
mode, path = sys.argv[1], sys.argv[2]
if mode == "baseline":
    loader.empty_model(hub.load_config(path), torch.bfloat16)
elif mode == "engine":
    loader.load_model(path)
else:
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                      device_map="cpu")
"""


def peak(mode: str, model: Path) -> int:
    from qlora_engine.machine import child_peak_rss

    try:
        return child_peak_rss(CHILD, [mode, model], {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except RuntimeError as e:
        sys.exit(f"error: the {mode} load failed: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="bf16 checkpoint dir (default: the cached SmolLM2-135M-Instruct)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qlora_engine import resolve_model

    model = resolve_model(a.model or "SmolLM2-135M-Instruct")
    size = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    base = peak("baseline", model)
    rows = [(name, peak(mode, model) - base) for name, mode in
            (("qlora_engine loader.load_model", "engine"), ("transformers + bitsandbytes from_pretrained", "bnb"))]
    mib = 2**20
    print(f"checkpoint {model}: {size / mib:.0f} MiB of safetensors; baseline (imports + empty model) {base / mib:.0f} MiB")
    print("| loader | peak RSS over baseline (MiB) | vs checkpoint size |")
    print("|---|---|---|")
    for name, grow in rows:
        print(f"| {name} | {grow / mib:.0f} | {grow / size:.2f}x |")
    print(f"engine / transformers+bnb: {rows[0][1] / max(rows[1][1], 1):.2f}x")


if __name__ == "__main__":
    main()
