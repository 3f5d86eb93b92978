"""The memory planner: a byte-level model of one QLoRA training step of this engine, the solver that
picks batch size / sequence length / rank for a GPU, and `python -m qlora_engine.plan`.

The model follows the engine's code tensor by tensor (`scripts/validate_plan.py` checks it against
real steps): packed NF4 weights and constants, LoRA parameters, their gradients and optimizer
states (torch AdamW; bitsandbytes 8-bit blockwise / 32-bit, and which states bnb pages), what
autograd saves per decoder block (`presets.block_activations`), checkpointing and offload
(`recompute.py`), and a replay of the chunked loss's allocations (`loss.py`). GPU-only terms (CUDA
context, allocator slack, cuBLAS workspace, kernel workspaces) are modelled, and the table says so.

API (train.py needs the last two; see their docstrings):
  plan_memory(cfg, model, device_bytes=None) -> Plan        (Plan.table(), Plan.to_json(), Plan.fits)
  solve(cfg, model, device_bytes, maximize="batch") -> (new_cfg, Plan, explanation)
  resolve_auto(cfg, model_dir, device) -> (cfg without "auto", Plan, explanation)
  peak_report(plan, device) -> one line: predicted vs measured peak, for the end of a GPU run
Reads config, presets and gpus; touches CUDA only in `resolve_auto` / `peak_report`.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict, dataclass, field, replace

from . import gpus, presets
from .config import ConfigError, RunConfig
from .sizes import fmt_bytes, parse_size

BF16 = 2
CUDA_ROUND = 512  # the caching allocator rounds every block up to 512 bytes
CUDA_CONTEXT = 512 * 2**20  # modelled: driver context + kernel images of torch, cuBLAS, bnb (0.3-0.7 GiB seen)
CUBLAS_WORKSPACE = 32 * 2**20  # modelled: cuBLAS/cuBLASLt workspaces, taken from the caching allocator
ALLOCATOR_SLACK = 0.05  # modelled: reserved-but-unallocated share of the transient peak (fragmentation)
HOST_BASELINE = 3 * 2**30  # modelled: the Python process with torch, CUDA libraries, tokenizer, data
PAGED_MIN_NUMEL = 100_000  # bnb get_state_buffer: states of smaller tensors are ordinary device tensors
MIN_8BIT_NUMEL = 4096  # bnb min_8bit_size: smaller parameters keep 32-bit states
RANKS = (8, 16, 32, 64, 128)
PHASES = {"persistent": "held all step", "forward": "end of the forward (the loss)",
          "backward": "backward of the last block", "step": "optimizer step",
          "overhead": "GPU overhead (not allocated tensors)", "paged": "unified memory (bnb paged)", "host": "host RAM"}


class PlanError(ValueError):
    """Settings the plan cannot be made for (the message says which and why)."""


@dataclass
class Knobs:
    """The RunConfig fields memory depends on, resolved (no 'auto')."""

    batch: int
    seq: int
    rank: int
    lora_bytes: int  # 2 (bf16) or 4 (fp32) per LoRA parameter
    targets: object  # target_modules, as lora.target_names takes it
    dropout: float
    optim: str  # adamw | paged_adamw_8bit | paged_adamw_32bit, as optim.resolve leaves it
    checkpointing: bool
    offload: bool
    loss_chunk: int
    base: str  # nf4 or bf16
    blocksize: int
    double_quant: bool
    packing: bool
    device: str  # "cuda" or "cpu": which engine paths run (dropout masks, dequantize temporaries, paging)
    grad_accum: int = 1
    target_fraction: float = 1.0  # share of positions with a target (the planner assumes all: train_on_prompt)


@dataclass
class Component:
    """One line of the table: bytes, in which phase they count, and how we know."""

    name: str
    bytes: int
    phase: str  # a key of PHASES
    basis: str  # validated (scripts/validate_plan.py measures it) | modelled
    note: str = ""


@dataclass
class Plan:
    """Predicted memory of one training step; `total` is what the GPU must hold (paged states aside)."""

    model: str
    knobs: Knobs
    components: list[Component]
    capacity: int | None
    margin: float
    peak_allocated: int  # the prediction for torch.cuda.max_memory_allocated
    peak_phase: str
    total: int
    host_bytes: int
    paged_bytes: int
    notes: list[str] = field(default_factory=list)
    terms: dict = field(default_factory=dict)  # named bytes for code: weights, lora, optimizer, saved_blocks ...

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.usable

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    def verdict(self) -> str:
        if self.capacity is None:
            return f"needs {fmt_bytes(self.total)} (no GPU given)"
        cap, use = fmt_bytes(self.capacity), fmt_bytes(self.usable)
        if self.fits:
            return f"fits: {fmt_bytes(self.total)} of {use} usable ({cap} less {self.margin:.0%} margin)"
        return f"does not fit: {fmt_bytes(self.total)} > {use} usable ({fmt_bytes(self.total - self.usable)} over)"

    def table(self) -> str:
        k = self.knobs
        ckpt = ("on" + (" + offload" if k.offload else "")) if k.checkpointing else "off"
        line = "  {:<62} {:>11}  {:<10} {}".format
        dtype = "bf16" if k.lora_bytes == 2 else "fp32"
        rows = [f"{self.model}: batch {k.batch} x seq {k.seq}, LoRA r={k.rank} ({dtype})"
                f" on {k.targets}, {k.optim}, checkpointing {ckpt}, loss chunk {k.loss_chunk}, {k.base} base, "
                f"planned for {k.device}", line("component", "bytes", "basis", "note"), "-" * 110]  # fmt: skip
        for phase, title in PHASES.items():
            comps = [c for c in self.components if c.phase == phase]
            rows += [f"[{title}]"] * bool(comps) + [line(c.name, fmt_bytes(c.bytes), c.basis, c.note) for c in comps]
            if phase in ("forward", "backward", "step"):
                with_held = self.phase_bytes("persistent") + self.phase_bytes(phase)
                rows.append(line("= with what is held all step", fmt_bytes(with_held), "", ""))
        rows += ["-" * 110,
                 line(f"peak allocated (at the {self.peak_phase})", fmt_bytes(self.peak_allocated), "", "predicts "
                      "torch.cuda.max_memory_allocated"),
                 line("GPU total (peak + overhead)" if k.device == "cuda" else "total", fmt_bytes(self.total), "", ""),
                 line("capacity", fmt_bytes(self.capacity) if self.capacity else "-", "", ""),
                 line("host RAM needed", fmt_bytes(self.host_bytes), "", ""), f"verdict: {self.verdict()}"]  # fmt: skip
        return "\n".join(rows + [f"note: {n}" for n in self.notes])

    def to_json(self) -> dict:
        return asdict(self) | {"usable": self.usable, "fits": self.fits, "verdict": self.verdict()}


# ----------------------------------------------------------------------------------------------
# the parts


def _r(n: int, kind: str) -> int:
    """A tensor's bytes as the allocator counts them."""
    return -(-n // CUDA_ROUND) * CUDA_ROUND if kind == "cuda" and n else n


def nf4_tensor_bytes(numel: int, blocksize: int, double_quant: bool) -> list[int]:
    """Bytes of each tensor an NF4Linear holds: packed codes, absmax, code table, nested absmax and
    nested table. Their sum is `nf4.packed_bytes`."""
    nblocks = -(-numel // blocksize)
    if double_quant:
        return [(numel + 1) // 2, nblocks, 16 * 4, 4 * -(-nblocks // 256), 256 * 4]
    return [(numel + 1) // 2, 4 * nblocks, 16 * 4]


def weight_parts(shape: presets.ModelShape, k: Knobs) -> list[Component]:
    lin, L = shape.linears, shape.layers
    if k.base == "nf4":
        sizes = [b for x in lin for b in nf4_tensor_bytes(x.in_features * x.out_features, k.blocksize, k.double_quant)]
        name = f"NF4 weights + quant constants ({len(lin) * L} linears)"
        note = f"blocksize {k.blocksize}" + (", double-quant" if k.double_quant else "")
    else:
        sizes, name, note = [BF16 * x.in_features * x.out_features for x in lin], "bf16 base weights", "base: bf16"
    dense = BF16 * (shape.outer_dense_elems + L * shape.block_dense_elems) + shape.buffer_bytes
    emb = "embeddings" + ("" if shape.tie_embeddings else " + lm_head")
    return [Component(name, L * sum(_r(b, k.device) for b in sizes), "persistent", "validated", note),
            Component(f"16-bit params ({emb}, norms, biases)", dense, "persistent", "validated")]


def lora_tensors(shape: presets.ModelShape, k: Knobs) -> list[int]:
    """Element counts of every LoRA parameter tensor (A [r, in], B [out, r]) in the model."""
    per_block = [n for x in shape.target_linears(k.targets) for n in (k.rank * x.in_features, x.out_features * k.rank)]
    return per_block * shape.layers


def optimizer_parts(numels: list[int], k: Knobs) -> tuple[int, int, str]:
    """(bytes on the device, bytes paged, description) of the optimizer state after the first step."""
    dev = paged = 0
    if k.optim == "adamw":  # torch AdamW: exp_avg, exp_avg_sq in the parameter dtype, a float32 step tensor
        for n in numels:
            dev += 2 * _r(n * k.lora_bytes, k.device) + _r(4, k.device)
        return dev, 0, "torch AdamW: 2 states in the LoRA dtype + step"
    eight = k.optim == "paged_adamw_8bit"
    for n in numels:
        if eight and n >= MIN_8BIT_NUMEL:
            state, dev = 2 * n, dev + 2 * _r(4 * -(-n // 256), k.device)  # uint8 state1/2 + float32 absmax1/2
        else:
            state = 2 * 4 * n  # float32 state1/2
        if n >= PAGED_MIN_NUMEL and k.device == "cuda":  # on the CPU bnb allocates ordinary tensors
            paged += state
        else:
            dev += 2 * _r(state // 2, k.device)
    if eight:
        dev += 2 * _r(256 * 4, k.device)  # the two shared quantization maps
    what = "8-bit blockwise (256), 32-bit below 4096 elements" if eight else "32-bit"
    return dev, paged, f"bnb {what}; states of tensors >= 1e5 elements paged"


def loss_buffers(n: int, hidden: int, vocab: int, chunk: int, softcap: bool, act: int = BF16) -> tuple[int, int]:
    """(grad_h bytes, peak bytes of the chunk loop above grad_h) of `loss._ChunkedCrossEntropy.forward`.

    A replay of its allocations in program order with Python's reference semantics: a rebound name
    frees its old tensor only when no other name holds it (chunk i's logits, still held as `p`,
    are alive while chunk i+1's are computed).
    """
    held: dict[str, int] = {}  # Python name -> tensor id
    size: dict[int, int] = {}  # live tensor id -> bytes
    ids, cur, peak = itertools.count(), 0, 0

    def alloc(nbytes: int) -> int:
        nonlocal cur, peak
        tid = next(ids)
        size[tid], cur = nbytes, cur + nbytes
        peak = max(peak, cur)
        return tid

    def release(tid: int) -> None:
        nonlocal cur
        if tid in size and tid not in held.values():
            cur -= size.pop(tid)

    def bind(name: str, tid: int) -> None:  # `name = tensor`
        old, held[name] = held.get(name), tid
        if old is not None:
            release(old)

    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        cv = c * vocab
        bind("mm", alloc(cv * act))  # hc @ Wᵀ in the activation dtype
        bind("z", alloc(cv * 4))  # .float()
        release(held.pop("mm"))
        if softcap:
            bind("d", alloc(cv * 4))  # z / softcap
            bind("t", alloc(cv * 4))  # tanh
            release(held.pop("d"))
            bind("z", alloc(cv * 4))  # softcap * t
        release(alloc(cv * 4))  # logsumexp: (z - max).exp_() then sum
        bind("p", held["z"])  # exp_(z.sub_(lse)) works in place: p and z are one tensor
        if softcap:
            bind("tt", alloc(cv * 4))  # t * t
            release(alloc(cv * 4))  # 1 - t*t, multiplied into p
            release(held.pop("tt"))
        bind("pb", alloc(cv * act))  # p.div_(n).to(h.dtype)
        release(alloc(c * hidden * act))  # ... @ weight, copied into grad_h
        release(held.pop("pb"))
        for name in ("p", "z", "t"):  # `z = p = t = None` at the end of the chunk
            tid = held.pop(name, None)
            if tid is not None:
                release(tid)
    return n * hidden * act, peak


# ----------------------------------------------------------------------------------------------
# the whole step


def knobs_from(cfg: RunConfig, device: str = "cuda") -> Knobs:
    """The knobs of `cfg` as the trainer resolves them on `device` ("cuda" or "cpu")."""
    import torch

    from . import optim

    for key in ("batch_size", "seq_len"):
        if getattr(cfg, key) == "auto":
            raise PlanError(f"{key} is auto: solve() chooses it")
    ckpt = bool(cfg.gradient_checkpointing if cfg.gradient_checkpointing != "auto" else device == "cuda")
    name = "adamw" if device != "cuda" and cfg.optim != "auto" else optim.resolve(cfg.optim, torch.device(device))
    return Knobs(batch=int(cfg.batch_size), seq=int(cfg.seq_len), rank=int(cfg.lora_r),
                 lora_bytes=2 if cfg.lora_dtype == "bf16" else 4, targets=cfg.target_modules,
                 dropout=float(cfg.lora_dropout), optim=name, checkpointing=ckpt,
                 offload=bool(cfg.offload_activations) and ckpt and device == "cuda", loss_chunk=int(cfg.loss_chunk),
                 base=cfg.base, blocksize=int(cfg.blocksize), double_quant=bool(cfg.double_quant),
                 packing=bool(cfg.packing), device=device, grad_accum=int(cfg.grad_accum))  # fmt: skip


def check_settings(shape: presets.ModelShape, k: Knobs) -> None:
    if k.rank < 1:
        raise PlanError(f"lora_r must be at least 1, got {k.rank}")
    if k.batch < 1 or k.seq < 1:
        raise PlanError(f"batch_size and seq_len must be at least 1, got {k.batch} and {k.seq}")
    if shape.max_positions and k.seq > shape.max_positions:
        raise PlanError(f"seq_len {k.seq} is over {shape.name}'s max_position_embeddings ({shape.max_positions})")


def _rows(phase: str, rows: list[tuple]) -> list[Component]:
    """(name, bytes, basis[, note]) rows of one phase."""
    return [Component(name, nbytes, phase, basis, *note) for name, nbytes, basis, *note in rows]


def plan_knobs(shape: presets.ModelShape, k: Knobs, capacity: int | None = None, margin: float = 0.05) -> Plan:
    """The plan for resolved knobs (the solver calls this in its loops).

    Three moments can set the peak: the end of the forward (every saved tensor, the loss buffers),
    the backward of the last block (its recompute and working set) and the optimizer step (all
    gradients). Gradients are set to None after each step, so with grad_accum 1 they do not exist
    during the forward and only one block's exist at the start of the backward.
    """
    check_settings(shape, k)
    dev, L, H, V, a = k.device, shape.layers, shape.hidden, shape.vocab, BF16
    M = k.batch * k.seq
    N = max(1, int(round(M * k.target_fraction)))
    t: dict[str, int] = {}  # stable keys for code (validation, tests); the components carry the words
    comps = weight_parts(shape, k)
    t["weights"], t["dense"] = comps[0].bytes, comps[1].bytes
    numels = lora_tensors(shape, k)
    t["lora"] = t["grads"] = sum(_r(n * k.lora_bytes, dev) for n in numels)
    t["optimizer"], t["paged"], opt_note = optimizer_parts(numels, k)
    n_t = len(shape.target_linears(k.targets))
    comps += _rows("persistent", [
        (f"LoRA params (r={k.rank}, {n_t} per block x {L})", t["lora"], "validated",
         f"{sum(numels) / 1e6:.1f}M params"),
        (f"optimizer states on the device ({k.optim})", t["optimizer"], "validated", opt_note)]
        + [("cuBLAS workspace", CUBLAS_WORKSPACE, "modelled")] * (dev == "cuda"))  # fmt: skip
    act = presets.block_activations(shape, k.batch, k.seq, k.rank, k.targets, k.dropout, dev, k.packing, k.base)
    t["layer"], t["rotary"], t["inputs"] = sum(act.saved.values()), act.rotary, L * M * H * a
    t["grad_h"], loss_peak = loss_buffers(N, H, V, min(k.loss_chunk, N), bool(shape.final_logit_softcapping), a)
    t["loss"] = t["grad_h"] + loss_peak
    t["head"] = M * H * 4 + M * 4 + (H * 4 if shape.norm_scale_fp32 else 0) + M  # final norm: fp32 copy, rsqrt; mask
    all_grads = k.grad_accum > 1
    grads = [("LoRA grads (accumulating)", t["grads"], "validated")] if all_grads else []
    if k.checkpointing:
        t["saved_blocks"] = 0 if k.offload else t["inputs"]
        t["recompute"] = t["layer"] + act.rotary
        keep = f"{fmt_bytes(act.rotary)} cos/sin, {fmt_bytes(act.masks)} masks"
        blocks = [(f"checkpointed block inputs ({L} x B x T x hidden)" + (", offloaded" if k.offload else ""),
                   t["saved_blocks"], "validated"),
                  ("rotary tables, masks (held by the recompute closures)", act.rotary + act.masks, "modelled", keep)]
        in_bwd = [("checkpointed block inputs" + (" (one brought back)" if k.offload else ""),
                   M * H * a if k.offload else t["inputs"], "validated"),
                  ("recompute: one block's saved activations + rotary", t["recompute"], "validated"),
                  ("attention masks", act.masks, "modelled")]
    else:
        t["saved_blocks"] = L * t["layer"] - act.first_layer_norm + act.rotary
        blocks = [(f"saved activations of all {L} blocks + rotary tables", t["saved_blocks"], "validated"),
                  ("attention masks", act.masks, "modelled")]
        in_bwd = blocks
    capped = ", soft-capped" if shape.final_logit_softcapping else ""
    fwd = _rows("forward", blocks + grads + [
        ("final norm saved + target mask", t["head"], "validated"),
        ("final hidden + selected target rows", M * H * a + N * H * a, "modelled", "live while the loss runs"),
        (f"loss: grad_h [{N} x {H}] + chunk logits", t["loss"], "validated",
         f"chunk {min(k.loss_chunk, N)} x vocab {V} fp32{capped}")])  # fmt: skip
    # each measured against the block's full saved set: the attention's backward runs once the MLP's tensors are freed
    work = {"MLP backward": act.bwd_work, "forward recompute": act.fwd_work,
            "attention backward": max(0, act.attn_work - act.after_attention)}
    worst = max(work, key=work.get)
    others = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in work.items() if n != worst)
    step_tmp = 2 * max(n * k.lora_bytes for n in numels) if k.optim == "adamw" and dev == "cpu" else 0
    bwd = _rows("backward", in_bwd + [
        ("working set of one block (the largest of three)", work[worst], "modelled", f"{worst}; {others}"),
        ("LoRA grads" + (" (accumulating)" if all_grads else ": the last block's"),
         t["grads"] if all_grads else t["grads"] // L, "validated")])
    stp = _rows("step", [("LoRA grads (all)", t["grads"], "validated", "same dtype as the params"),
                         ("optimizer step temporaries", step_tmp, "modelled", "torch AdamW on the CPU: per tensor")])
    comps += [c for c in fwd + bwd + stp if c.bytes or c.basis == "validated"]
    persistent = sum(c.bytes for c in comps if c.phase == "persistent")
    phases = {"end of forward": sum(c.bytes for c in fwd), "backward of the last block": sum(c.bytes for c in bwd),
              "optimizer step": sum(c.bytes for c in stp)}
    phase = max(phases, key=phases.get)
    peak = total = persistent + phases[phase]
    notes = ["per-block saved activations: " + ", ".join(f"{n} {fmt_bytes(b)}" for n, b in act.saved.items())]
    if dev == "cuda":
        slack = max(128 * 2**20, int(ALLOCATOR_SLACK * phases[phase]))
        comps += _rows("overhead", [("allocator slack (reserved, not allocated)", slack, "modelled"),
                                    ("CUDA context + kernel images", CUDA_CONTEXT, "modelled")])
        total += slack + CUDA_CONTEXT
    if t["paged"]:
        comps += _rows("paged", [("optimizer states, paged (bnb unified memory)", t["paged"], "modelled",
                                  "on the GPU when there is room, else in host RAM; not in the total")])
        # torch keeps its peak reserved, so the states stay resident only in what is left beside it
        room = capacity is None or total + t["paged"] <= capacity
        notes.append(f"paged optimizer states ({fmt_bytes(t['paged'])}) " + (
            "stay resident on the GPU beside the peak" if room else
            "do not fit beside the peak: the driver pages them to host RAM as needed (slower, not an error)"))
    loader = BF16 * max(shape.vocab * H, max(x.in_features * x.out_features for x in shape.linears))
    comps += _rows("host", [("process: torch, CUDA libraries, tokenizer, data", HOST_BASELINE, "modelled"),
                            ("loader: the largest checkpoint tensor", loader, "modelled", "read one at a time")]
                   + [("paged optimizer states, if all evicted", t["paged"], "modelled")] * bool(t["paged"])
                   + [("offloaded block inputs (pinned)", t["inputs"], "modelled")] * k.offload)  # fmt: skip
    if shape.attn_impl != "varlen":
        notes.append(f"attention runs transformers' {shape.attn_impl} path (sliding window / soft-capping): "
                     "T² terms per block")
    host = sum(c.bytes for c in comps if c.phase == "host")
    return Plan(shape.name, k, comps, capacity, margin, peak, phase, total, host, t["paged"], notes, t)


def plan_memory(cfg: RunConfig, model, device_bytes: int | None = None, device: str = "cuda",
                margin: float = 0.05) -> Plan:
    """The memory plan of `cfg` for `model` (preset name, config dict/object, config.json or checkpoint dir).

    `device_bytes`: the GPU's capacity (None: no verdict). `device`: "cuda" plans the GPU paths,
    "cpu" the CPU ones (what `scripts/validate_plan.py` measures)."""
    return plan_knobs(presets.load_shape(model), knobs_from(cfg, device), device_bytes, margin)


# ----------------------------------------------------------------------------------------------
# the solver


def _largest(fits, lo: int, hi: int) -> int | None:
    """The largest x in [lo, hi] with fits(x), for a monotone fits (True then False); None if none."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggestions(shape: presets.ModelShape, k: Knobs, capacity: int, margin: float = 0.05) -> list[str]:
    """What would make a plan that does not fit, fit: one line per option, each planned in full."""

    def fits(kk: Knobs, cap: int = capacity) -> bool:
        return plan_knobs(shape, kk, cap, margin).fits

    tries = []
    if not k.checkpointing:
        tries.append(("gradient_checkpointing true", replace(k, checkpointing=True)))
    elif not k.offload and k.device == "cuda":
        tries.append(("offload_activations true", replace(k, offload=True)))
    if k.optim != "paged_adamw_8bit" and k.device == "cuda":
        tries.append(("optim paged_adamw_8bit", replace(k, optim="paged_adamw_8bit")))
    if k.batch > 1:
        tries.append(("batch_size 1", replace(k, batch=1)))
    out = [f"{label}: {fmt_bytes(plan_knobs(shape, kk, capacity, margin).total)} ({'fits' if fits(kk) else 'too big'})"
           for label, kk in tries]
    step = 128 if k.seq > 128 else 8
    seq = _largest(lambda x: fits(replace(k, batch=1, seq=x * step)), 1, max(1, k.seq // step))
    if seq:
        out.append(f"seq_len {seq * step} with batch_size 1: the longest that fits")
    smaller = [r for r in RANKS if r < k.rank and fits(replace(k, rank=r))]
    if smaller:
        out.append(f"lora_r {smaller[-1]}: the largest of {RANKS} below {k.rank} that fits")
    bigger = [g for g in gpus.by_capacity() if g.total_bytes > capacity and fits(k, g.total_bytes)]
    out.append(f"a bigger GPU: {bigger[0].name} ({fmt_bytes(bigger[0].total_bytes)}) is the smallest in the table "
               "that fits as is" if bigger else "no GPU in the table fits these settings as they are")
    return out


def default_target(cfg: RunConfig) -> str:
    """What `solve` maximizes when only "auto" values say so: the batch if it is auto, else seq_len."""
    return "batch" if cfg.batch_size == "auto" or cfg.seq_len != "auto" else "seq_len"


def solve(cfg: RunConfig, model, device_bytes: int, maximize: str = "batch", margin: float = 0.05,
          device: str = "cuda", max_batch: int = 1024) -> tuple[RunConfig, Plan, str]:
    """Choose what `maximize` names ("batch", "seq_len" or "rank") as large as fits `device_bytes`.

    An "auto" seq_len is chosen first: the longest multiple of 128 that fits at the given batch
    (1 if auto), capped by the model's max_position_embeddings; then "rank" picks the largest of
    RANKS, and the batch is maximized when it is auto or `maximize` is "batch". Every candidate is
    planned in full and only a plan that fits is returned.
    Returns (the config with the choices, their plan, a one-paragraph explanation); raises
    PlanError saying what would fit when even the smallest setting does not."""
    shape = presets.load_shape(model)
    if maximize not in ("batch", "seq_len", "rank"):
        raise PlanError(f"maximize must be batch, seq_len or rank, got {maximize!r}")
    b0 = 1 if cfg.batch_size == "auto" else int(cfg.batch_size)
    max_seq = shape.max_positions or 131072
    k = knobs_from(cfg.replace(batch_size=b0, seq_len=min(max_seq, 512) if cfg.seq_len == "auto" else cfg.seq_len),
                   device)
    check_settings(shape, k)
    step = 128 if max_seq >= 128 else 8
    why: list[str] = []

    def need(kk: Knobs) -> str:
        return fmt_bytes(plan_knobs(shape, kk, device_bytes, margin).total)

    def fits(kk: Knobs) -> bool:
        return plan_knobs(shape, kk, device_bytes, margin).fits

    if cfg.seq_len == "auto" or maximize == "seq_len":
        n = _largest(lambda x: fits(replace(k, seq=x * step)), 1, max_seq // step)
        if n is None:
            raise _nothing_fits(shape, replace(k, seq=step), device_bytes, margin)
        k = replace(k, seq=n * step)
        limit = (f"the model's limit is {max_seq}" if n == max_seq // step
                 else f"{k.seq + step} would need {need(replace(k, seq=k.seq + step))}")
        why.append(f"seq_len {k.seq}: the longest multiple of {step} that fits at batch {b0} ({limit})")
    if maximize == "rank":
        ok = [r for r in RANKS if fits(replace(k, rank=r))]
        if not ok:
            raise _nothing_fits(shape, replace(k, rank=RANKS[0]), device_bytes, margin)
        k = replace(k, rank=ok[-1])
        nxt = [r for r in RANKS if r > k.rank]
        why.append(f"lora_r {k.rank}: the largest of {RANKS} that fits"
                   + (f"; r={nxt[0]} would need {need(replace(k, rank=nxt[0]))}" if nxt else ""))
    if cfg.batch_size == "auto" or maximize == "batch":
        b = _largest(lambda x: fits(replace(k, batch=x)), 1, max_batch)
        if b is None:
            raise _nothing_fits(shape, replace(k, batch=1), device_bytes, margin)
        k = replace(k, batch=b)
        why.append(f"batch_size {b}: the largest that fits at seq_len {k.seq}; "
                   f"{b + 1} would need {need(replace(k, batch=b + 1))}")
    p = plan_knobs(shape, k, device_bytes, margin)
    if not p.fits:  # cannot happen after the searches above; a guard for the promise in the docstring
        raise _nothing_fits(shape, k, device_bytes, margin)
    why.append(f"{p.verdict()}; the peak is at the {p.peak_phase}")
    return cfg.replace(batch_size=k.batch, seq_len=k.seq, lora_r=k.rank), p, "; ".join(why)


def _nothing_fits(shape, k: Knobs, capacity: int, margin: float) -> PlanError:
    p = plan_knobs(shape, k, capacity, margin)
    tips = "; ".join(suggestions(shape, k, capacity, margin))
    return PlanError(f"nothing fits: batch {k.batch} x seq {k.seq} at r={k.rank} needs {fmt_bytes(p.total)}, "
                     f"usable {fmt_bytes(p.usable)}; would fit: {tips}")


# ----------------------------------------------------------------------------------------------
# the trainer's side


def resolve_auto(cfg: RunConfig, model, device) -> tuple[RunConfig, Plan, str]:
    """For train.py, before the data is prepared: replace batch_size / seq_len "auto" by the solver's
    choice for `device` (a torch.device; CUDA: its total memory; CPU: the host's available RAM), and
    return the plan of the final settings, to compare with the measured peak at the end."""
    kind = "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    if kind == "cuda":
        import torch

        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        import os

        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if cfg.batch_size != "auto" and cfg.seq_len != "auto":
        p = plan_memory(cfg, model, capacity, kind)
        return cfg, p, f"memory plan: {p.verdict()}"
    new_cfg, p, why = solve(cfg, model, capacity, default_target(cfg), device=kind)
    return new_cfg, p, f"auto settings: {why}"


def peak_report(plan: Plan, device) -> str:
    """One line for the end of a run: the plan's predicted peak against torch's measured one."""
    if getattr(device, "type", str(device)) != "cuda":
        return f"memory plan: predicted peak {fmt_bytes(plan.peak_allocated)} (the measured comparison needs CUDA)"
    import torch

    got, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    err = (plan.peak_allocated - got) / max(got, 1)
    paged = f"; {fmt_bytes(plan.paged_bytes)} of paged optimizer state, not counted by torch" * bool(plan.paged_bytes)
    return (f"memory: predicted peak allocated {fmt_bytes(plan.peak_allocated)}, measured {fmt_bytes(got)} "
            f"({err:+.1%}); reserved {fmt_bytes(reserved)}; predicted GPU total {fmt_bytes(plan.total)} with "
            f"the CUDA context{paged}")


# ----------------------------------------------------------------------------------------------
# the command


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .config import parse_args

    ap = argparse.ArgumentParser(prog="python -m qlora_engine.plan", add_help=False, description=(
        "Memory plan of a QLoRA run: --model (preset, config.json or checkpoint dir), --gpu or --gpu-memory, plus "
        "--config run.yaml and any finetune flag (python scripts/finetune.py --help lists them)"))  # fmt: skip
    ap.add_argument("--gpu", help="GPU name from the table (4090, a100-80gb, h100, ...)")
    ap.add_argument("--gpu-memory", help="capacity instead of a GPU name, e.g. 24GiB")
    ap.add_argument("--maximize", choices=("batch", "seq_len", "rank"), help="the largest of these that fits")
    ap.add_argument("--margin", type=float, default=0.05, help="fraction of the GPU kept free [0.05]")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--list", action="store_true", help="list the GPUs and model presets")
    ap.add_argument("-h", "--help", action="store_true")
    mine, rest = ap.parse_known_args(argv)
    if mine.help:
        ap.print_help()
        return 0
    if mine.list:
        print("GPUs:", ", ".join(f"{g.name} ({fmt_bytes(g.total_bytes)})" for g in gpus.GPUS))
        print("models:", ", ".join(presets.PRESETS))
        return 0
    gpu, explanation = None, None
    try:
        cfg = parse_args(rest, "python -m qlora_engine.plan", "memory plan")
        gpu = gpus.find_gpu(mine.gpu) if mine.gpu else None
        capacity = gpu.total_bytes if gpu else parse_size(mine.gpu_memory) if mine.gpu_memory else None
        if not 0 <= mine.margin < 1:
            raise PlanError(f"--margin must be in [0, 1), got {mine.margin}")
        if mine.maximize or "auto" in (cfg.batch_size, cfg.seq_len):
            if capacity is None:
                raise PlanError("choosing batch_size/seq_len/rank needs a GPU: give --gpu NAME or --gpu-memory SIZE")
            cfg, p, explanation = solve(cfg, cfg.model, capacity, mine.maximize or default_target(cfg), mine.margin)
        else:
            p = plan_memory(cfg, cfg.model, capacity, "cuda", mine.margin)
        tips = [] if p.fits else suggestions(presets.load_shape(cfg.model), p.knobs, capacity, mine.margin)
    except (ConfigError, presets.ShapeError, PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if mine.json:
        extra = {"gpu": gpu and gpu.name, "explanation": explanation, "would_fit": tips}
        print(json.dumps(p.to_json() | extra, indent=2, default=str))
        return 0
    print(p.table() + (f"\nGPU: {gpu.name}" if gpu else "") + (f"\nchoice: {explanation}" if explanation else ""))
    if tips:
        print("would fit:\n  " + "\n  ".join(tips))
    return 0


if __name__ == "__main__":
    sys.exit(main())
