"""The memory model: a byte-level account of one QLoRA training step of this engine, component by
component, phase by phase (`plan_memory`, `plan_knobs` -> `Plan`).

It follows the engine's code tensor by tensor (`scripts/validate_plan.py` checks it against real
steps): packed NF4 weights and constants, LoRA parameters, their gradients and optimizer states
(torch AdamW; bitsandbytes 8-bit blockwise / 32-bit, and which states bnb pages), what autograd
saves per decoder block (`shapes.block_activations`), checkpointing and offload
(`train.recompute`), and the chunked loss's buffers, measured by running `train.loss`'s own
forward on the meta device (`loss_buffers`). GPU-only terms (CUDA context, allocator slack, cuBLAS
workspace) are modelled, and the table says so. Reads `train.config`, `train.optim` (optimizer
names) and `train.loss`; never touches CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import InputError
from ..machine import fmt_bytes
from ..train.config import RunConfig
from . import shapes

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


class PlanError(InputError):
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


def weight_parts(shape: shapes.ModelShape, k: Knobs) -> list[Component]:
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


def lora_tensors(shape: shapes.ModelShape, k: Knobs) -> list[int]:
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
    """(grad_h bytes, peak bytes of the chunk loop above grad_h) of `train.loss.ChunkedCrossEntropy`
    for n target rows: measured by running that forward itself on the meta device (no memory, no
    arithmetic) under `LiveBytes`. Every chunk starts from the same state, so two chunks (a full
    one and the last, partial one) show the peak of any n."""
    import torch

    from ..train.loss import ChunkedCrossEntropy

    key = (n, hidden, vocab, chunk, bool(softcap), act)
    if key not in _LOSS_CACHE:
        dtype = {2: torch.bfloat16, 4: torch.float32}[act]
        rows = min(n, chunk) + (n % chunk if n > chunk else 0)
        h = torch.empty(rows, hidden, dtype=dtype, device="meta", requires_grad=True)
        w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
        y = torch.zeros(rows, dtype=torch.long, device="meta")
        grad_h = rows * hidden * act
        with LiveBytes() as live:
            ChunkedCrossEntropy.forward(_Ctx(), h, w, None, y, float(n), chunk, float(softcap) if softcap else 0.0)
        _LOSS_CACHE[key] = (n * hidden * act, live.peak - grad_h)
    return _LOSS_CACHE[key]


_LOSS_CACHE: dict[tuple, tuple[int, int]] = {}


class _Ctx:
    """Stands in for autograd's ctx when a Function's forward is run on its own."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _logsumexp_work(args) -> int:
    x = args[0]
    return x.numel() * 4  # ATen: sum((x - max).exp_()) holds one float32 copy of x


class LiveBytes:
    """A dispatch mode that counts the bytes of every tensor storage created inside it while that
    storage is alive (views and in-place results share their storage's bytes), and the peak.
    Works on the meta device, where nothing is allocated: the planner runs the engine's own code
    under it to learn what that code would allocate. Storages that existed before (the inputs) are
    not counted. A kernel's internal temporaries are invisible at this level; for the ops the
    engine's code uses that have them, `INTERNAL` gives their size, counted for the op's duration."""

    INTERNAL = {"aten.logsumexp.default": _logsumexp_work}

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        live, counts, external = {}, {}, set()
        self.cur = self.peak = 0
        tracker = self

        def release(key):
            counts[key] -= 1
            if counts[key] == 0:
                tracker.cur -= live.pop(key)
                del counts[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                for t in tree_leaves((args, kwargs)):
                    if hasattr(t, "untyped_storage") and t.untyped_storage()._cdata not in live:
                        external.add(t.untyped_storage()._cdata)
                work = LiveBytes.INTERNAL.get(str(func))
                if work:
                    tracker.peak = max(tracker.peak, tracker.cur + work(args))
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage"):
                        key = t.untyped_storage()._cdata
                        if key in external:
                            continue
                        if key not in live:
                            live[key], counts[key] = t.untyped_storage().nbytes(), 0
                            tracker.cur += live[key]
                            tracker.peak = max(tracker.peak, tracker.cur)
                        counts[key] += 1
                        weakref.finalize(t, release, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# the whole step


def knobs_from(cfg: RunConfig, device: str = "cuda") -> Knobs:
    """The knobs of `cfg` as the trainer resolves them on `device` ("cuda" or "cpu")."""
    import torch

    from ..train import optim

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


def check_settings(shape: shapes.ModelShape, k: Knobs) -> None:
    if k.rank < 1:
        raise PlanError(f"lora_r must be at least 1, got {k.rank}")
    if k.batch < 1 or k.seq < 1:
        raise PlanError(f"batch_size and seq_len must be at least 1, got {k.batch} and {k.seq}")
    if shape.max_positions and k.seq > shape.max_positions:
        raise PlanError(f"seq_len {k.seq} is over {shape.name}'s max_position_embeddings ({shape.max_positions})")


def _rows(phase: str, rows: list[tuple]) -> list[Component]:
    """(name, bytes, basis[, note]) rows of one phase."""
    return [Component(name, nbytes, phase, basis, *note) for name, nbytes, basis, *note in rows]


def plan_knobs(shape: shapes.ModelShape, k: Knobs, capacity: int | None = None, margin: float = 0.05) -> Plan:
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
    act = shapes.block_activations(shape, k.batch, k.seq, k.rank, k.targets, k.dropout, dev, k.packing, k.base)
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
    return plan_knobs(shapes.load_shape(model), knobs_from(cfg, device), device_bytes, margin)
