"""The layer weight pipeline, measured: a decoder block's forward + backward with bf16 weights
(cuBLAS), with NF4 dequantized per call, and with NF4 through the pipeline; and an offloaded base
(a 70B shape) under a memory cap, against the planner's prediction.

    python scripts/bench_pipeline.py                                   # CPU: tiny shapes (figures labelled CPU)
    python scripts/bench_pipeline.py --device cuda --preset llama-3.1-8b --tokens 2048 --layers 4
    python scripts/bench_pipeline.py --device cuda --offload --preset llama-2-70b --tokens 1024 --cap-gib 24
    python scripts/bench_pipeline.py --offload                         # CPU: the offloaded path on tiny shapes
    python scripts/bench_pipeline.py --device cuda --context --preset llama-3.1-8b --cap-gib 24

Blocks (default): a stack of `--layers` decoder blocks of the preset's shapes, random weights built
on the device (no checkpoint), vocabulary `--vocab` (small, so that the blocks dominate), LoRA r=16
on every linear layer, recompute on, varlen attention; one packed row of `--tokens` tokens (4
samples). Per system, the median step time (forward + backward, no optimizer step) over `--steps`
after `--warmup`, divided by the number of blocks, and the peak memory:
  bf16      the blocks' weights in bf16 (nn.Linear, cuBLAS): the floor the pipeline aims at
  nf4       NF4, dequantized per matmul (3 times per block and step with recompute)
  nf4+pipe  NF4 through the weight pipeline (dequantized once per direction, one block ahead; on
            CUDA on a side stream), with the side stream's dequantize time measured by events
Offload (`--offload`): every layer of the preset (its real vocabulary), NF4 blocks quantized on the
device and moved straight to pinned host memory (`train.weights.OffloadPlacer`, as the loader does),
under `torch.cuda.set_per_process_memory_fraction(--cap-gib)`; training steps (paged AdamW 8-bit on
CUDA) with the offloaded pipeline. Reports peak allocated memory, tokens/s, and the host-to-device
copy time and bandwidth measured by events, against the plan (`plan.memory`: its peak and its
PCIe bytes at PCIE_BYTES_PER_S).
Context (`--context`): every layer of the preset, NF4 on the device, under the same cap; the planner
picks the longest sequence that fits at batch 1 (checkpointing with the block inputs offloaded, the
chunked loss, the weight pipeline as it decides), and two training steps run at it: fits or not,
peak allocated against the plan, tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qlora_engine import machine  # noqa: E402
from qlora_engine.lora.inject import add_lora, trainable_parameters  # noqa: E402
from qlora_engine.models.loader import Placer, empty_model  # noqa: E402
from qlora_engine.models.structure import block_linear_names, replace_module  # noqa: E402
from qlora_engine.plan import memory, presets  # noqa: E402
from qlora_engine.quant import ops  # noqa: E402
from qlora_engine.quant.linear import NF4Linear  # noqa: E402
from qlora_engine.train import attention, config, optim, recompute, weights  # noqa: E402
from qlora_engine.train.evaluate import autocast  # noqa: E402
from qlora_engine.train.loss import causal_lm_loss  # noqa: E402

TINY = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False, hidden_act="silu")  # fmt: skip
SYSTEMS = ("bf16", "nf4", "nf4+pipe")


def shape_config(a) -> dict:
    cfg = dict(TINY) if a.preset == "tiny" else presets.preset_config(a.preset)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    if not (a.offload or a.context):  # the block A/B: a small vocabulary, and room for --tokens
        cfg["vocab_size"] = a.vocab
        cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings") or 0, a.tokens)
    return cfg


def build(cfg: dict, device: torch.device, base: str, placer: Placer | None = None, seed: int = 0) -> nn.Module:
    """The model of `cfg` with random N(0, 0.02) weights made on `device`, one tensor at a time (the
    loader's order of events): block linears NF4 through `placer` (or bf16 nn.Linear), the rest bf16."""
    from transformers import AutoConfig

    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    model = empty_model(AutoConfig.for_model(cfg["model_type"], **kw), torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    placer = placer or Placer(device)
    targets = set(block_linear_names(model))
    for name in sorted(targets):
        lin = model.get_submodule(name)
        w = torch.randn(lin.out_features, lin.in_features, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        bias = lin.bias is not None  # filled below with the other 16-bit parameters
        if base == "bf16":
            new = nn.Linear(lin.in_features, lin.out_features, bias=bias, device="meta")
            new.weight = nn.Parameter(w, requires_grad=False)
        else:
            new = NF4Linear(lin.in_features, lin.out_features, bias=bias, device="meta")
            placer.quantized(new, name, *ops.quantize_weight(w, 64, "nf4", True))
        replace_module(model, name, new)
        del w
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            mod_name, _, attr = name.rpartition(".")
            t = torch.ones(p.shape, dtype=p.dtype, device=device) if "norm" in name else (
                torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.02)
            model.get_submodule(mod_name)._parameters[attr] = nn.Parameter(t, requires_grad=False)
    for name, b in list(model.named_buffers()):
        if b.device != device and not any(name.startswith(t + ".") for t in targets):
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name)._buffers[attr] = b.to(device)
    model.requires_grad_(False)
    return model


def batch(tokens: int, vocab: int, device: torch.device, samples: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    cut = [tokens * i // samples for i in range(samples + 1)]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cut[:-1], cut[1:])]).unsqueeze(0)
    return {k: v.to(device) for k, v in {"input_ids": ids, "position_ids": pos, "targets": ids.roll(-1, 1)}.items()}


def prepare(model: nn.Module, device: torch.device, pipeline: bool, offload: bool = False, offload_inputs: bool = False):
    add_lora(model, 16, 32, 0.05, target_modules="all-linear", dtype=torch.bfloat16, seed=0)
    attention.use_varlen(model)
    recompute.enable(model, offload=offload_inputs)
    w = weights.Weights(pipeline, offload, "bench_pipeline", device, seed=0)  # add_lora's seed above
    line = w.attach(model)
    model.train()
    return w.pipe, line


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device, base_rss: int = 0) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else machine.peak_rss() - base_rss


def bench_blocks(a, device) -> list[str]:
    cfg = shape_config(a)
    L = cfg["num_hidden_layers"]
    b = batch(a.tokens, cfg["vocab_size"], device)
    rows = {}
    for system in SYSTEMS:
        model = build(cfg, device, "bf16" if system == "bf16" else "nf4")
        pipe, _ = prepare(model, device, system == "nf4+pipe")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        machine.reset_peak_rss()
        base_rss = machine.rss()
        times, deq = [], []
        for i in range(a.warmup + a.steps):
            if pipe is not None:
                pipe.profile = i >= a.warmup
            sync(device)
            t0 = time.perf_counter()
            with autocast(device):
                loss, _ = causal_lm_loss(model, b)
            loss.backward()
            sync(device)
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
                if pipe is not None:
                    deq.append(pipe.timings()[1])
            model.zero_grad(set_to_none=True)
        step = statistics.median(times)
        rows[system] = (step / L, peak(device, base_rss), statistics.median(deq) / L if deq else None)
        print(f"  {system}: {step / L * 1e3:.2f} ms per block", file=sys.stderr)
        del model, pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    label = "" if device.type == "cuda" else " (CPU figures: nothing runs beside the compute, the dequantize is in the step)"
    out = [f"Per decoder block, forward + backward with recompute, {a.preset} shapes ({L} blocks, vocab "
           f"{cfg['vocab_size']}), {a.tokens} tokens (one packed row of 4 samples), LoRA r=16 on all linears, bf16"
           f"{label}", "", "| system | ms per block | vs bf16 | peak memory (MiB) | dequantize (ms per block; CUDA: on the side stream) |",
           "|---|---|---|---|---|"]  # fmt: skip
    ref = rows["bf16"][0]
    for s, (t, m, d) in rows.items():
        out.append(f"| {s} | {t * 1e3:.2f} | {t / ref:.2f}x | {m / 2**20:.0f} | {'-' if d is None else f'{d * 1e3:.2f}'} |")
    return out


def bench_offload(a, device) -> list[str]:
    cfg = shape_config(a)
    L, tokens = cfg["num_hidden_layers"], a.tokens
    cap = int(a.cap_gib * 2**30)
    cap_memory(device, cap)
    run = config.from_dict(dict(model="bench", seq_len=tokens, batch_size=1, gradient_checkpointing=True, lora_r=16,
                                lora_alpha=32, offload_base=True, weight_pipeline=True))  # fmt: skip
    plan = memory.plan_memory(run, cfg, cap, device.type)
    t0 = time.perf_counter()
    model = build(cfg, device, "nf4", weights.OffloadPlacer(device))
    built = time.perf_counter() - t0
    pipe, line = prepare(model, device, True, offload=True)
    print(f"  built in {built:.0f} s; {line}", file=sys.stderr)
    b = batch(tokens, cfg["vocab_size"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    machine.reset_peak_rss()
    base_rss = machine.rss()
    copies, copied, before = [], [], [0]

    def start(i):
        pipe.profile = i >= a.warmup
        before[0] = pipe.stats["copied_bytes"]

    def measured(i):
        copies.append(pipe.timings()[0])
        copied.append(pipe.stats["copied_bytes"] - before[0])

    step, opt_name = train_steps(model, device, b, a.steps, a.warmup, start, measured)
    copy, nbytes = statistics.median(copies), statistics.median(copied)
    got = peak(device, base_rss)
    t = plan.terms
    where = "GPU" if device.type == "cuda" else "CPU (host memory stands in for the device: no PCIe)"
    return [f"Offloaded base, {a.preset} shapes ({L} blocks, vocab {cfg['vocab_size']}), {tokens} tokens, batch 1, "
            f"LoRA r=16, recompute, {opt_name}, cap {a.cap_gib:g} GiB, on {where}; {a.steps} steps after {a.warmup}",
            "", "| | measured | planned |", "|---|---|---|",
            f"| fits under the cap | {'yes' if device.type != 'cuda' or got <= cap else 'no'} | {plan.verdict()} |",
            f"| peak allocated (MiB) | {got / 2**20:.0f} | {plan.peak_allocated / 2**20:.0f} |",
            f"| NF4 base in host memory (MiB) | {pipe.host_bytes() / 2**20:.0f} | {t['nf4_host'] / 2**20:.0f} |",
            f"| bytes copied per step (MiB) | {nbytes / 2**20:.0f} | {t['pcie_bytes'] / 2**20:.0f} |",
            f"| copy time per step (s) | {copy:.3f} | {t['pcie_seconds']:.3f} (at {memory.PCIE_BYTES_PER_S / 1e9:.0f} GB/s) |",
            f"| copy bandwidth (GB/s) | {nbytes / max(copy, 1e-9) / 1e9:.1f} | {memory.PCIE_BYTES_PER_S / 1e9:.0f} |",
            f"| step time (s) | {step:.3f} | >= {t['pcie_seconds']:.3f} (PCIe-bound floor) |",
            f"| tokens/s | {tokens / step:.0f} | <= {tokens / max(t['pcie_seconds'], 1e-9):.0f} |",
            f"| build (quantize + pin) (s) | {built:.0f} | |"]  # fmt: skip


def cap_memory(device, cap: int) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def train_steps(model, device, b, steps: int, warmup: int, start=None, measured=None) -> tuple[float, str]:
    """(median step seconds, optimizer name) of `warmup` + `steps` optimizer steps on batch `b`;
    start(i) runs before step i, measured(i) after each measured one."""
    params = [p for _, p in trainable_parameters(model)]
    opt, name = optim.build(params, "auto", 1e-4, 0.0, device)
    times = []
    for i in range(warmup + steps):
        if start:
            start(i)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss, _ = causal_lm_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if measured:
                measured(i)
    return statistics.median(times), name


def bench_context(a, device) -> list[str]:
    from qlora_engine.plan import solver

    cfg = shape_config(a)
    cap = int(a.cap_gib * 2**30)
    run = config.from_dict(dict(model="bench", seq_len=512, batch_size=1, gradient_checkpointing=True,
                                offload_activations=True, lora_r=16, lora_alpha=32))  # fmt: skip
    new, plan, why = solver.solve(run, cfg, cap, maximize="seq_len", device=device.type)
    seq = new.seq_len
    cap_memory(device, cap)
    model = build(cfg, device, "nf4")
    _, line = prepare(model, device, bool(plan.knobs.weight_pipeline), offload_inputs=True)
    b = batch(seq, cfg["vocab_size"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    machine.reset_peak_rss()
    base_rss = machine.rss()
    try:
        step, opt_name = train_steps(model, device, b, a.steps, a.warmup)
        got, ok = peak(device, base_rss), "yes"
    except torch.OutOfMemoryError as e:
        step, opt_name, got, ok = float("nan"), "-", peak(device, base_rss), f"no: {str(e).splitlines()[0][:120]}"
    where = "GPU" if device.type == "cuda" else "CPU (the cap is not enforced)"
    return [f"Longest context, {a.preset} shapes ({cfg['num_hidden_layers']} blocks, vocab {cfg['vocab_size']}), batch 1, "
            f"LoRA r=16, checkpointing with the block inputs offloaded, chunked loss, cap {a.cap_gib:g} GiB, on {where}",
            "", f"planner: {why}", line or "weight pipeline: off", "", "| | measured | planned |", "|---|---|---|",
            f"| sequence (one packed row of 4 samples) | {seq} | {seq} |",
            f"| fits under the cap | {ok} | {plan.verdict()} |",
            f"| peak allocated (MiB) | {got / 2**20:.0f} | {plan.peak_allocated / 2**20:.0f} |",
            f"| step time (s), {opt_name} | {step:.2f} | |", f"| tokens/s | {seq / step:.0f} | |"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="a planner preset (llama-3.1-8b, llama-2-70b, ...); default: tiny")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: 4; --offload: all of the preset's)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 2048 on CUDA, 512 on the CPU)")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary of the block benchmark [1024]")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--offload", action="store_true", help="the offloaded base under --cap-gib instead of the block A/B")
    ap.add_argument("--context", action="store_true", help="the longest sequence the planner fits under --cap-gib, run")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="--offload / --context: the memory cap in GiB [24]")
    ap.add_argument("--write", default=None, help="also write the table as markdown to this file")
    a = ap.parse_args()
    device = machine.resolve_device(a.device)
    a.preset = a.preset or "tiny"
    a.tokens = a.tokens or (2048 if device.type == "cuda" else 512)
    if a.layers is None and not (a.offload or a.context):
        a.layers = 4
    torch.manual_seed(0)
    lines = bench_offload(a, device) if a.offload else bench_context(a, device) if a.context else bench_blocks(a, device)
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    lines[1:1] = [f"machine: {machine.describe(device.type)}; torch {torch.__version__}", f"command: `{cmd}`"]
    print("\n".join(lines))
    if a.write:
        from qlora_engine.models.tensorfiles import write_text_atomic

        write_text_atomic(a.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
