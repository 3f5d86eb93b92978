"""Training throughput and peak memory: qlora_engine vs transformers + PEFT + bitsandbytes, same run.

    python scripts/bench_train.py                       # CPU: SmolLM2-135M, seq 512, batch 1, r 16
    python scripts/bench_train.py --device cuda --model DIR --seq 2048 --batch 2 --checkpointing
    python scripts/bench_train.py --write benchmarks/train-cpu.md
    python scripts/bench_train.py --device cuda --model DIR --pipeline true   # ours with the layer weight pipeline

Each system runs in its own subprocess (so peak memory is its own) on the same packed rows of the
bundled demo data, LoRA on every linear layer (dropout 0.05), bf16, AdamW (paged 8-bit on CUDA):
- ours: the engine's training recipe (`qlora_engine.Recipe`: NF4 base, fused LoRA autograd, varlen
  attention, chunked loss), stepped with `Recipe.train_step`;
- peft: the standard recipe, `prepare_model_for_kbit_training` + `get_peft_model` + `model(labels=)`;
- peft-no-upcast: the same without `prepare_model_for_kbit_training` (no fp32 copies of the
  16-bit parameters), the faster variant some users run.
MFU (CUDA) is model FLOPs per second over the GPU's dense bf16 peak (`--peak-tflops`, or the table
below by device name). Model FLOPs per token, as PaLM counts them but for a frozen base: 4 x the
frozen linear weights (forward and the input gradient; no weight gradient) + 6 x the LoRA weights +
6 x layers x seq x hidden for causal attention (the whole row; packed samples attend to less); the
recompute of checkpointing is not counted.
Tokens/s is the median over the timed steps after warm-up; peak memory is the process's peak RSS
growth on CPU, `torch.cuda.max_memory_allocated` on CUDA. The allocator is left at its defaults:
forcing glibc to mmap every large buffer (`MALLOC_MMAP_THRESHOLD_`) tightens the RSS figure but
puts a page-fault storm in every step (it cost this engine's checkpointed step 60%), which is not
the speed a user sees. On CUDA, `ours-nokernels` repeats ours
with the CUDA extension switched off (the end-to-end effect of csrc/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SYSTEMS = ("ours", "peft", "peft-no-upcast")
# dense bf16 peak TFLOP/s (vendor datasheets, no sparsity), by a part of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "RTX 4090": 165.2, "RTX A6000": 154.8, "RTX 3090": 71.0}  # fmt: skip


def flops_per_token(model_dir, seq: int, rank: int) -> float:
    """Model FLOPs of one trained token (module docstring), from the planner's shape of the model."""
    from qlora_engine.plan.shapes import load_shape

    s = load_shape(model_dir)
    frozen = s.layers * sum(x.in_features * x.out_features for x in s.linears) + s.vocab * s.hidden
    lora = s.layers * sum(rank * (x.in_features + x.out_features) for x in s.linears)
    return 4 * frozen + 6 * lora + 6 * s.layers * seq * s.heads * s.head_dim


def peak_flops(given: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s, its source) of this CUDA device, or (None, why)."""
    import torch

    if given:
        return given * 1e12, f"{given:g} TFLOP/s (--peak-tflops)"
    name = torch.cuda.get_device_name()
    key = next((k for k in PEAK_TFLOPS if k in name), None)
    if key is None:
        return None, f"{name}: no peak in the table (pass --peak-tflops)"
    return PEAK_TFLOPS[key] * 1e12, f"{PEAK_TFLOPS[key]:g} TFLOP/s dense bf16 ({key} datasheet)"


def batches(tok, seq: int, batch: int, n: int):
    from qlora_engine import RunConfig
    from qlora_engine.train import data

    cfg = RunConfig.make(data="demo", seq_len=seq)
    rows = data.make_rows(data.prepare(cfg, tok).train.samples, seq, packing=True)
    rows = sorted(rows, key=lambda r: -len(r.ids))  # the fullest rows, the same for every system
    out = []
    for i in range(n):
        pick = [rows[(i * batch + j) % len(rows)] for j in range(batch)]
        out.append(data.collate(pick, tok.pad_token_id))
    return out


def run_one(system: str, a) -> dict:
    import torch

    torch.manual_seed(0)
    from qlora_engine import load_tokenizer, machine, resolve_model

    model_dir = resolve_model(a.model)
    tok = load_tokenizer(model_dir)
    device = torch.device(a.device)
    data = batches(tok, a.seq, a.batch, a.warmup + a.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    machine.reset_peak_rss()
    base_rss = machine.rss()

    if system.startswith("ours"):
        from qlora_engine import Recipe, RunConfig

        if system == "ours-nokernels":
            from qlora_engine.quant import cuda

            cuda.set_enabled(False)
        cfg = RunConfig.make(model=str(model_dir), lora_r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                             device=a.device, seed=0, seq_len=a.seq, batch_size=a.batch, lr=2e-4, max_grad_norm=0,
                             gradient_checkpointing=a.checkpointing, output_dir=tempfile.mkdtemp(), max_steps=len(data),
                             weight_pipeline=a.pipeline)  # fmt: skip
        recipe = Recipe(cfg, train_data=[{"text": "unused"}] * 2, eval_data=[{"text": "unused"}], out=lambda s: None)
        recipe.setup()
        recipe.model.train()

        def step(b):
            return recipe.train_step([b])["loss"]
    else:
        import peft
        import transformers

        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                                  device_map={"": device})  # fmt: skip
        if system == "peft":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.checkpointing)
        elif a.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
        model.train()  # bnb's CPU eval mode repacks weights; never evaluate before training
        params = [p for p in model.parameters() if p.requires_grad]
        if device.type == "cuda":
            import bitsandbytes as bnb

            opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
        else:
            opt = torch.optim.AdamW(params, lr=2e-4)

        def step(b):
            labels = b["targets"].roll(1, 1)  # transformers shifts labels itself: labels[t+1] = targets[t]
            labels[:, 0] = -100
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss)

    times, tokens = [], []
    for i, b in enumerate(data):
        b = {k: v.to(device) for k, v in b.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(b["input_ids"].numel())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else machine.peak_rss() - base_rss
    tps = statistics.median(n / t for n, t in zip(tokens, times))
    return {"system": system, "tokens_per_s": tps, "step_s": statistics.median(times), "peak_bytes": peak}


def _without_write(args: list[str]) -> list[str]:
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
        elif x == "--write":
            skip = True
        elif not x.startswith("--write="):
            out.append(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--pipeline", default="false", choices=("true", "false"),
                    help="ours: the layer weight pipeline (weight_pipeline) on or off [false]")
    ap.add_argument("--systems", default=None, help="comma-separated subset of " + ", ".join(SYSTEMS + ("ours-nokernels",)))
    ap.add_argument("--write", default=None, help="also write the table as markdown to this file")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU [by name]")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one system, print JSON
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a)))
        return
    systems = a.systems.split(",") if a.systems else list(SYSTEMS) + (["ours-nokernels"] if a.device == "cuda" else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results = []
    for s in systems:
        argv = [sys.executable, __file__, "--one", s] + _without_write(sys.argv[1:])
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{s}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1][7:]))
        print(f"  {s}: {results[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    from qlora_engine import resolve_model
    from qlora_engine.machine import describe

    ours = next((r for r in results if r["system"] == "ours"), None)
    per_token = flops_per_token(resolve_model(a.model), a.seq, a.rank)
    peak, peak_note = peak_flops(a.peak_tflops) if a.device.startswith("cuda") else (None, "CPU: no MFU")
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    lines = [f"Training step, {a.model}, seq {a.seq}, batch {a.batch}, LoRA r={a.rank} on all linear layers, "
             f"checkpointing {'on' if a.checkpointing else 'off'}, ours with the weight pipeline "
             f"{'on' if a.pipeline == 'true' else 'off'}, {a.steps} timed steps after {a.warmup} warm-up",
             f"machine: {describe(a.device)}; torch {__import__('torch').__version__}", f"command: `{cmd}`",
             f"MFU: {per_token / 1e9:.2f} GFLOP per token (module docstring) over {peak_note}", "",
             "| system | tokens/s | step (s) | peak memory (MiB) | MFU | ours / system: speed | memory |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
        mem = f"{ours['peak_bytes'] / r['peak_bytes']:.2f}x" if ours and r["peak_bytes"] > 0 else "-"
        mfu = f"{100 * r['tokens_per_s'] * per_token / peak:.1f}%" if peak else "-"
        lines.append(f"| {r['system']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | {mfu} "
                     f"| {speed} | {mem} |")  # fmt: skip
    print("\n".join(lines))
    if a.write:
        from qlora_engine.models.tensorfiles import write_text_atomic

        write_text_atomic(a.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
