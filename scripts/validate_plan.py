"""Check the memory planner against real training steps of this engine, component by component.

    python scripts/validate_plan.py            # CPU: SmolLM2-135M + tiny llama/qwen2/phi3/mistral/gemma2 (~9 min)
    python scripts/validate_plan.py --gpu      # CUDA: random-weight 1B-13B-shaped checkpoints
    python scripts/validate_plan.py --gpu --cases 0,1,2 --workdir /scratch/ckpts   # a part, keeping the checkpoints

Each case sets up the training recipe itself (`qlora_engine.Recipe`: model, LoRA, recompute,
optimizer) and steps it as the recipe does (`causal_lm_loss`, backward, clip, step) and measures:
parameter bytes (NF4 buffers, 16-bit tensors, LoRA), gradient bytes after backward, optimizer state
after a step, the tensors autograd saves for backward (a `saved_tensors_hooks` tracker, deduplicated
by storage, parameters excluded: the live total at the end of the forward, split at the final norm,
and with checkpointing the peak during one block's recompute), the chunked loss's buffers, and the
peak of the whole step (CPU: the allocator events the profiler records; CUDA: max_memory_allocated).
Writes benchmarks/plan-validation-cpu.md (or benchmarks/plan-validation.md with --gpu).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qlora_engine import Recipe, RunConfig, machine  # noqa: E402
from qlora_engine.models import default_model  # noqa: E402
from qlora_engine.models.loader import QuantSpec  # noqa: E402
from qlora_engine.models.synthetic import random_checkpoint  # noqa: E402
from qlora_engine.plan import memory, presets, shapes  # noqa: E402
from qlora_engine.quant.linear import NF4Linear  # noqa: E402
from qlora_engine.train import data  # noqa: E402
from qlora_engine.train.evaluate import autocast  # noqa: E402
from qlora_engine.train.loss import ChunkedCrossEntropy, causal_lm_loss  # noqa: E402

TOLERANCE = 0.05
# The architectures of tests/conftest.py's tiny checkpoints (widened so that per-token terms are not
# lost in per-tensor ones): llama with GQA, qwen2 with q/k/v biases and tied embeddings, phi3 with
# fused projections; mistral with a sliding window (transformers' SDPA path with a mask) and gemma2
# (eager attention, soft-capped logits).
_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024)
TINY = {
    "llama": dict(_SMALL, model_type="llama", hidden_size=192, intermediate_size=320, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, vocab_size=320, tie_word_embeddings=False),
    "qwen2": dict(_SMALL, model_type="qwen2", num_key_value_heads=2, vocab_size=288, tie_word_embeddings=True),
    "phi3": dict(_SMALL, model_type="phi3", num_key_value_heads=4, vocab_size=320, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
    "mistral": dict(_SMALL, model_type="mistral", num_key_value_heads=2, head_dim=32, vocab_size=300,
                    sliding_window=96),
    "gemma2": dict(_SMALL, model_type="gemma2", num_key_value_heads=2, head_dim=32, vocab_size=512, sliding_window=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=32),
}


@dataclass
class Case:
    """One measured configuration."""

    model: str  # "smollm2", a TINY key, or a preset name (GPU mode)
    seq: int
    batch: int
    rank: int
    checkpointing: bool
    packing: bool
    dropout: float = 0.05
    chunk: int = 1024
    optim: str = "auto"
    offload: bool = False
    lora_dtype: str = "bf16"

    def label(self) -> str:
        ckpt = ("on" + "+offload" * self.offload) if self.checkpointing else "off"
        return (f"{self.model} seq {self.seq} x batch {self.batch}, r={self.rank}, ckpt {ckpt}, "
                f"packing {'on' if self.packing else 'off'}, dropout {self.dropout}, "
                f"{self.optim}, chunk {self.chunk}{', fp32 LoRA' if self.lora_dtype == 'fp32' else ''}")  # fmt: skip


CPU_CASES = [
    Case("smollm2", 256, 2, 16, True, True),
    Case("smollm2", 512, 1, 64, False, False, dropout=0.0),
    Case("smollm2", 128, 4, 8, False, True, chunk=128, optim="paged_adamw_8bit"),
    Case("llama", 128, 4, 8, False, True),
    Case("llama", 512, 2, 32, True, False, dropout=0.0, optim="paged_adamw_32bit"),
    Case("qwen2", 256, 2, 32, True, False, lora_dtype="fp32"),
    Case("phi3", 384, 2, 16, False, True, chunk=256),
    Case("mistral", 256, 2, 16, False, True),
    Case("gemma2", 256, 2, 64, False, True, chunk=128),
]
GPU_CASES = [
    Case("llama-3.2-1b", 2048, 4, 16, True, True),
    Case("llama-3.2-1b", 1024, 8, 64, False, True),
    Case("llama-3.2-3b", 4096, 2, 32, True, True, optim="paged_adamw_32bit"),
    Case("gemma-2-2b", 1024, 2, 16, True, True),
    Case("llama-2-7b", 512, 8, 64, False, False, dropout=0.0),
    Case("mistral-7b-v0.3", 4096, 1, 8, True, True),
    Case("mistral-7b-v0.3", 2048, 2, 16, True, True, offload=True),
    Case("qwen2.5-7b", 2048, 4, 16, True, True),
    Case("llama-2-13b", 1024, 1, 64, True, False, optim="paged_adamw_32bit"),
    Case("llama-2-13b", 4096, 2, 16, True, True, offload=True),
]


# ----------------------------------------------------------------------------------------------
# checkpoints


def tiny_checkpoint(root: Path, arch: str) -> Path:
    """A random bf16 checkpoint of a TINY config (the loader quantizes it, as for a real model)."""
    d = root / f"tiny-{arch}"
    if not (d / "config.json").exists():
        random_checkpoint(d, TINY[arch], std=0.05, tokenizer="word-level")
    return d


def random_nf4_checkpoint(root: Path, name: str, device: str) -> Path:
    """A random-weight checkpoint of a preset, saved already in 4 bits (bnb keys) so that even 13B
    shapes are written and loaded quickly; the loader reads it as a pre-quantized model."""
    d = root / f"random-{name}"
    if not (d / "config.json").exists():
        random_checkpoint(d, presets.preset_config(name), quant=QuantSpec(), tokenizer="word-level", device=device)
    return d


def model_dir(case: Case, root: Path, device: str) -> Path:
    if case.model == "smollm2":
        return default_model.ensure()
    if case.model in TINY:
        return tiny_checkpoint(root, case.model)
    return random_nf4_checkpoint(root, case.model, device)


# ----------------------------------------------------------------------------------------------
# measuring


class SavedTracker:
    """Live bytes of the tensors autograd saves for backward, each storage counted once, parameters
    and buffers excluded. `with tracker:` installs the hooks; a holder object per saved tensor tells
    the tracker when autograd lets go of it."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.refs, self.size = exclude, {}, {}
        self.live = self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return t
        if self.refs.get(ptr, 0) == 0:
            self.size[ptr] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        return _Held(t, self, ptr)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.size.pop(ptr)

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class _Held:
    __slots__ = ("t", "tracker", "ptr")

    def __init__(self, t, tracker, ptr):
        self.t, self.tracker, self.ptr = t, tracker, ptr

    def __del__(self):
        self.tracker.release(self.ptr)


# CPU GEMM kernels allocate scratch inside the op (packed operand copies) and free it before returning;
# that is library workspace, not an engine tensor (on CUDA its counterpart is the fixed cuBLAS workspace).
_SCRATCH_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                "aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def cpu_alloc_peak(fn):
    """(fn(), peak of live tensor bytes allocated during fn above the start, peak of GEMM scratch)
    from the allocation events torch.profiler records (the CPU allocator keeps no statistics)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], [(n, None) for n in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        n, parent = stack.pop()
        if n.tag == _EventType.Allocation:
            f = n.extra_fields
            events.append((n.start_time_ns, f.alloc_size, f.ptr, id(parent) if parent is not None else 0,
                           parent.name if parent is not None else ""))  # fmt: skip
        stack.extend((c, n) for c in n.children)
    events.sort(key=lambda e: e[0])
    open_alloc, scratch = {}, set()
    for i, (_, size, ptr, pid, pname) in enumerate(events):
        if size > 0:
            open_alloc[ptr] = i
        elif ptr in open_alloc:
            j = open_alloc.pop(ptr)
            if pname in _SCRATCH_OPS and events[j][3] == pid:
                scratch.update((i, j))
    cur = peak = s_cur = s_peak = 0
    for i, (_, size, *_rest) in enumerate(events):
        if i in scratch:
            s_cur += size
            s_peak = max(s_peak, s_cur)
            continue
        cur += size
        peak = max(peak, cur)
    return out, peak, s_peak


def storages(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def make_batch(seq: int, batch: int, packing: bool, vocab: int, seed: int) -> dict:
    """Full rows built with the data pipeline's own Row/Sample/collate: packed rows hold 2-4
    samples; every sample's first quarter is prompt (no target) and its last position has none."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        n = int(torch.randint(2, 5, (1,), generator=g)) if packing else 1
        cuts = sorted(torch.randperm(seq - 1, generator=g)[: n - 1].add(1).tolist()) if n > 1 else []
        row = data.Row()
        for a, b in zip([0] + cuts, cuts + [seq]):
            ids = torch.randint(3, vocab, (b - a,), generator=g).tolist()
            targets = ids[1:] + [data.IGNORE]
            targets[: (b - a) // 4] = [data.IGNORE] * ((b - a) // 4)
            row.add(data.Sample(ids, targets))
        rows.append(row)
    return data.collate(rows, pad_id=1)


TOKENS = [{"input_ids": [3, 4, 5, 6]}] * 4  # the recipe's data; the measured steps use make_batch's full rows


def measure(case: Case, root: Path, device: torch.device, profile_step: bool = True) -> tuple[dict, memory.Plan]:
    """Set up the recipe, step twice (the first step creates the optimizer state), measure the second.
    `profile_step=False` skips the CPU profiler (the whole-step peak), which is slow on a real model."""
    d = model_dir(case, root, device.type)
    cfg = RunConfig.make(model=str(d), lora_r=case.rank, lora_alpha=2 * case.rank, lora_dropout=case.dropout,
                         seq_len=case.seq, batch_size=case.batch, packing=case.packing, loss_chunk=case.chunk,
                         gradient_checkpointing=case.checkpointing, offload_activations=case.offload,
                         optim=case.optim, lora_dtype=case.lora_dtype, device=device.type, lr=1e-4, seed=0,
                         output_dir=str(root / "run"))  # fmt: skip
    rec = Recipe(cfg, train_data=TOKENS, eval_data=TOKENS, out=lambda s: None).setup()
    model, params, opt = rec.model, rec.params, rec.optimizer
    name = memory.knobs_from(cfg, device.type).optim
    if case.optim.startswith("paged") and device.type == "cpu":  # the class CUDA would get; on the CPU it does not page
        import bitsandbytes as bnb

        name = case.optim
        cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
        opt = cls(params, lr=1e-4)
    model.train()
    m: dict[str, int] = {}
    nf4_bufs = [b for mod in model.modules() if isinstance(mod, NF4Linear) for b in mod.buffers()]
    m["weights"] = storages(nf4_bufs)
    nf4_ptrs = {b.untyped_storage().data_ptr() for b in nf4_bufs}
    m["dense"] = storages(t for t in list(model.parameters()) + list(model.buffers())
                          if not t.requires_grad and t.untyped_storage().data_ptr() not in nf4_ptrs)  # fmt: skip
    m["lora"] = storages(params)
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    vocab = model.config.vocab_size
    norm = model.get_decoder().norm

    def step(batch, tracker=None, marks=None):
        b = {k: v.to(device) for k, v in batch.items()}
        n_step = int((b["targets"] != data.IGNORE).sum())
        with autocast(device):
            loss, _ = causal_lm_loss(model, b, n_norm=n_step, chunk=cfg.loss_chunk)
        if marks is not None:
            marks["fwd_end"] = tracker.live
            tracker.peak = tracker.live  # from here on: the backward peak
        loss.backward()
        if marks is not None:
            marks["grads"] = storages(p.grad for p in params)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(make_batch(case.seq, case.batch, case.packing, vocab, 1))  # creates the optimizer state
    m["optimizer"] = storages(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    batch = make_batch(case.seq, case.batch, case.packing, vocab, 2)
    n_targets = int((batch["targets"] != data.IGNORE).sum())
    tracker, marks = SavedTracker(exclude), {}
    hook = norm.register_forward_pre_hook(lambda mod, args: marks.__setitem__("blocks", tracker.live))
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        with tracker:
            step(batch, tracker, marks)
        torch.cuda.synchronize()
        m["peak"] = torch.cuda.max_memory_allocated(device)
    elif not profile_step:
        with tracker:
            step(batch, tracker, marks)
    else:
        states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        base = storages(list(model.parameters()) + list(model.buffers()) + states)
        with tracker:
            _, delta, m["scratch"] = cpu_alloc_peak(lambda: step(batch, tracker, marks))
        m["peak"] = base + delta
    hook.remove()
    m["grads"] = marks["grads"]
    m["saved_blocks"] = marks["blocks"]
    m["saved_head"] = marks["fwd_end"] - marks["blocks"]
    m["saved_bwd_peak"] = tracker.peak
    m["loss"] = loss_buffers_measured(model, batch, device, cfg.loss_chunk)
    k = replace(memory.knobs_from(cfg, device.type), optim=name, target_fraction=n_targets / (case.batch * case.seq))
    p = memory.plan_knobs(shapes.load_shape(d), k)
    del model, opt, rec
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return m, p


def loss_buffers_measured(model, batch, device, chunk: int) -> int:
    """Peak bytes allocated by the chunked loss itself (grad_h + chunk buffers), for given hidden states."""
    batch = {k: v.to(device) for k, v in batch.items()}
    sel = batch["targets"] != data.IGNORE
    with torch.no_grad(), autocast(device):
        out = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    hidden = out.last_hidden_state
    h = hidden[sel].detach().requires_grad_(True)
    del hidden, out
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None) or 0.0
    args = (h, head.weight, head.bias, batch["targets"][sel], float(int(sel.sum())), chunk, softcap)
    if device.type == "cpu":
        return cpu_alloc_peak(lambda: ChunkedCrossEntropy.apply(*args))[1]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with autocast(device):
        ChunkedCrossEntropy.apply(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def compare(case: Case, m: dict, p: memory.Plan) -> list[tuple[str, int, int | None, bool]]:
    """(component, planned, measured, checked against the 5% bar) rows of one case."""
    t, ckpt = p.terms, p.knobs.checkpointing
    rows = [("NF4 weights + quant constants", t["weights"], m["weights"], True),
            ("16-bit params + buffers", t["dense"], m["dense"], True),
            ("LoRA params", t["lora"], m["lora"], True),
            ("LoRA grads after backward", t["grads"], m["grads"], True),
            ("optimizer state after a step (device + paged)", t["optimizer"] + t["paged"], m["optimizer"], True),
            ("saved by the blocks, at the final norm" + (" (= block inputs)" if ckpt else " (+ rotary)"),
             t["saved_blocks"], m["saved_blocks"], True),
            ("saved by final norm + loss (grad_h, mask)", t["head"] + t["grad_h"], m["saved_head"], True)]  # fmt: skip
    if ckpt:
        in_recompute = m["saved_bwd_peak"] - m["saved_blocks"]
        rows.append(("saved, peak in one block's recompute (+ rotary)", t["recompute"], in_recompute, True))
    if m.get("loss") is not None:
        rows.append(("chunked loss: grad_h + chunk buffers (allocations)", t["loss"], m["loss"], True))
    how = " (profiler)" if p.knobs.device == "cpu" else ""
    rows.append((f"peak allocated, whole step{how}", p.peak_allocated, m.get("peak"), False))
    if "scratch" in m:
        rows.append(("CPU GEMM scratch inside matmul ops (not in the row above)", 0, m["scratch"], False))
    return rows


def error_text(planned: int, measured: int | None, checked: bool) -> str:
    if not measured:
        return "-"
    if not planned:
        return "not modelled"
    return f"{(planned - measured) / measured:+.1%}" + ("" if checked else " (modelled terms)")


# ----------------------------------------------------------------------------------------------
# report


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({machine.fmt_bytes(props.total_memory)}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{machine.describe('cpu')}, torch {torch.__version__}"


CPU_NOTES = [
    "Rows marked with an error in plain % are the validated components (bar: 5%). Measured with a",
    "`saved_tensors_hooks` tracker (saved tensors, deduplicated by storage, parameters excluded), the",
    "optimizer's state dict, `.grad`, the modules' buffers, and the profiler's allocation events (the",
    "chunked loss and the whole step; GEMM scratch freed inside a matmul op is library workspace, listed",
    "apart). Paged optimizers are the bnb classes CUDA would get; on the CPU they do not page.",
    "",
    "**Modelled, not validated here** (they exist only on a GPU): the CUDA context and kernel images,",
    "the caching allocator's rounding and slack (reserved minus allocated), the cuBLAS workspace, where",
    "bnb's paged states live (unified memory), the flash/efficient attention kernels' workspace, the",
    "CUDA dequantize-to-bf16 temporary (the CPU reference needs 10 bytes per weight element instead of",
    "2), and the dropout mask regenerated on CUDA (stored as bool on the CPU). The whole-step peak row",
    "includes the CPU versions of the working-set terms and is informative, not part of the bar.",
    "`benchmarks/plan-validation.md` (the same script with `--gpu`: `torch.cuda.max_memory_allocated`",
    "over random-weight 1B-13B checkpoints) remains to be run when a GPU is lent.",
]
GPU_NOTES = [
    "Validated components as in the CPU report (bar: 5%); the whole-step row compares the plan's",
    "`peak_allocated` with `torch.cuda.max_memory_allocated` over the measured step, which includes",
    "the modelled GPU terms (dequantized weight temporaries, flash-attention backward workspace, cuBLAS",
    "workspace). bnb's paged states are managed memory, invisible to torch's counters, and are",
    "excluded from both sides; the CUDA context and allocator slack are not in max_memory_allocated.",
]


def render(results, device: torch.device, command: str, seconds: float) -> str:
    ok = all(abs(pl - me) <= TOLERANCE * me for _, rows in results for _, pl, me, chk in rows if chk and me)
    whole = [(pl - me) / me for _, rows in results for n, pl, me, _ in rows if n.startswith("peak allocated") and me]
    spread = f"{min(whole):+.1%} to {max(whole):+.1%}" if whole else "not measured"
    lines = [f"# Memory plan validation ({'GPU' if device.type == 'cuda' else 'CPU'})", "",
             f"Command: `{command}`  ", f"Machine: {describe(device)}  ", f"Run time: {seconds:.0f} s", "",
             f"Every validated row (all but the whole-step peak and the scratch) agrees within {TOLERANCE:.0%}: "
             f"**{'yes' if ok else 'NO'}**. Whole-step peak, planned vs measured: {spread}.", ""]  # fmt: skip
    lines += (CPU_NOTES if device.type == "cpu" else GPU_NOTES) + [""]
    for case, rows in results:
        lines += [f"## {case.label()}", "", "| component | planned | measured | error |", "|---|---:|---:|---:|"]
        for name, pl, me, chk in rows:
            lines.append(f"| {name} | {pl:,} | {'-' if me is None else f'{me:,}'} | {error_text(pl, me, chk)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="validate on CUDA (random-weight 1B-13B checkpoints)")
    ap.add_argument("--cases", help="comma-separated case numbers to run (default: all)")
    ap.add_argument("--out", help="report path (default: benchmarks/plan-validation[-cpu].md)")
    ap.add_argument("--workdir", help="where random checkpoints are written (default: a temporary directory)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.gpu else "cpu")
    if a.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device", file=sys.stderr)
        return 2
    cases = GPU_CASES if a.gpu else CPU_CASES
    if a.cases:
        cases = [cases[int(i)] for i in a.cases.split(",")]
    out = Path(a.out or ROOT / "benchmarks" / ("plan-validation.md" if a.gpu else "plan-validation-cpu.md"))
    t0, results = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir or tmp)
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)}] {case.label()}", flush=True)
            try:
                m, p = measure(case, root, device)
            except torch.cuda.OutOfMemoryError:
                print("    out of memory", flush=True)
                continue
            rows = compare(case, m, p)
            for name, pl, me, chk in rows:
                print(f"    {name:<60} planned {machine.fmt_bytes(pl):>11}  measured {machine.fmt_bytes(me or 0):>11}  "
                      f"{error_text(pl, me, chk)}", flush=True)
            results.append((case, rows))
    command = "python scripts/validate_plan.py" + " --gpu" * a.gpu + (f" --cases {a.cases}" if a.cases else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, device, command, time.time() - t0) + "\n")
    print(f"wrote {out}")
    bad = [(c.label(), n) for c, rows in results for n, pl, me, chk in rows
           if chk and me and abs(pl - me) > TOLERANCE * me]
    for label, n in bad:
        print(f"over {TOLERANCE:.0%}: {label}: {n}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
