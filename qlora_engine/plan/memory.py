"""The memory model: a byte-level account of one QLoRA training step of this engine, component by
component, phase by phase (`plan_memory`, `plan_knobs` -> `Plan`).

It follows the engine's code tensor by tensor (`scripts/validate_plan.py` checks it against real
steps): packed NF4 weights and constants, LoRA parameters, their gradients and optimizer states
(torch AdamW; bitsandbytes 8-bit blockwise / 32-bit, and which states bnb pages), what autograd
saves per decoder block (`shapes.block_activations`), checkpointing and offload
(`train.recompute`), the chunked loss's buffers, measured by running `train.loss`'s own
forward on the meta device (`livebytes.loss_buffers`), and the base's weights during training
(`train.weights`): the weight pipeline's double buffer, an offloaded base's host RAM and PCIe
traffic, and the choice "auto" makes for each (registered with `train.weights` on import, so a
recipe's "auto" is this plan's decision). GPU-only terms (CUDA context, allocator slack, cuBLAS
workspace) are modelled, and the table says so. Reads `train.config`, `train.optim` (optimizer
names) and `train.loss`; never touches CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import InputError
from ..machine import fmt_bytes
from ..train import weights as train_weights
from ..train.config import RunConfig
from . import shapes
from .livebytes import loss_buffers

BF16 = 2
CUDA_ROUND = 512  # the caching allocator rounds every block up to 512 bytes
CUDA_CONTEXT = 512 * 2**20  # modelled: driver context + kernel images of torch, cuBLAS, bnb (0.3-0.7 GiB seen)
CUBLAS_WORKSPACE = 32 * 2**20  # modelled: cuBLAS/cuBLASLt workspaces, taken from the caching allocator
ALLOCATOR_SLACK = 0.05  # modelled: reserved-but-unallocated share of the transient peak (fragmentation)
HOST_BASELINE = 3 * 2**30  # modelled: the Python process with torch, CUDA libraries, tokenizer, data
PCIE_BYTES_PER_S = 25e9  # assumed host-to-GPU copy bandwidth of an offloaded base: PCIe 4.0 x16 (32 GB/s raw), pinned
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
    gpus: int = 1  # processes (one per GPU) sharing the run; batch is per process
    strategy: str = "ddp"  # ddp (each holds the base) or fsdp (the base, adapters and optimizer sharded)
    weight_pipeline: bool | str = False  # True, False or "auto" (plan_knobs decides, see choose_weights)
    offload_base: bool | str = False  # the NF4 blocks in pinned host memory, copied through the pipeline


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
        base = f"{k.base} base" + (" (offloaded)" if k.offload_base is True else "")
        pipe = {True: "on", False: "off"}.get(k.weight_pipeline, k.weight_pipeline)
        rows = [f"{self.model}: batch {k.batch} x seq {k.seq}, LoRA r={k.rank} ({dtype})"
                f" on {k.targets}, {k.optim}, checkpointing {ckpt}, loss chunk {k.loss_chunk}, {base}, "
                f"weight pipeline {pipe}, planned for {k.device}", line("component", "bytes", "basis", "note"),
                "-" * 110]  # fmt: skip
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


# ----------------------------------------------------------------------------------------------
# the whole step


def knobs_from(cfg: RunConfig, device: str = "cuda", gpus: int = 1) -> Knobs:
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
                 packing=bool(cfg.packing), device=device, grad_accum=int(cfg.grad_accum), gpus=int(gpus),
                 strategy=cfg.strategy if cfg.strategy != "auto" else "ddp", weight_pipeline=cfg.weight_pipeline,
                 offload_base=cfg.offload_base)  # fmt: skip


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
    fsdp = k.gpus > 1 and k.strategy == "fsdp"
    unable = (fsdp or k.base != "nf4") and (k.weight_pipeline or k.offload_base)
    if "auto" in (k.weight_pipeline, k.offload_base) or unable:
        return choose_weights(shape, k, capacity, margin)
    M = k.batch * k.seq
    N = max(1, int(round(M * k.target_fraction)))
    t: dict[str, int] = {}  # stable keys for code (validation, tests); the components carry the words
    comps = weight_parts(shape, k)
    t["weights"], t["dense"] = comps[0].bytes, comps[1].bytes
    comps += _pipeline_parts(shape, k, comps, t)
    numels = lora_tensors(shape, k)
    t["lora"] = t["grads"] = sum(_r(n * k.lora_bytes, dev) for n in numels)
    t["optimizer"], t["paged"], opt_note = optimizer_parts(numels, k)
    n_t = len(shape.target_linears(k.targets))
    comps += _rows("persistent", [
        (f"LoRA params (r={k.rank}, {n_t} per block x {L})", t["lora"], "validated",
         f"{sum(numels) / 1e6:.1f}M params"),
        (f"optimizer states on the device ({k.optim})", t["optimizer"], "validated", opt_note)]
        + [("cuBLAS workspace", CUBLAS_WORKSPACE, "modelled")] * (dev == "cuda"))  # fmt: skip
    dist_fwd, dist_bwd = _distributed(comps, t, shape, k)
    # with the pipeline on CUDA the matmuls read its buffer: no per-call dequantized weight (as with a bf16 base)
    per_call = "bf16" if k.weight_pipeline and dev == "cuda" else k.base
    act = shapes.block_activations(shape, k.batch, k.seq, k.rank, k.targets, k.dropout, dev, k.packing, per_call)
    if dev == "cuda" and shape.attn_impl == "varlen":  # train.attention's flash varlen call: its output is o_proj's input
        extra = act.saved.pop("LoRA input: attention out", 0)
        act = replace(act, after_attention=act.after_attention - extra)
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
    fwd = _rows("forward", dist_fwd + blocks + grads + [
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
    bwd = _rows("backward", dist_bwd + in_bwd + [
        ("working set of one block (the largest of three)", work[worst], "modelled", f"{worst}; {others}"),
        ("LoRA grads" + (" (accumulating)" if all_grads else ": the last block's"),
         t["grads"] if all_grads else t["grads"] // L, "validated")])
    stp = _rows("step", [("LoRA grads (all)" + (f", 1/{k.gpus} each (FSDP)" if fsdp else ""),
                          -(-t["grads"] // k.gpus) if fsdp else t["grads"], "validated", "same dtype as the params"),
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
                   + [("offloaded block inputs (pinned)", t["inputs"], "modelled")] * k.offload
                   + [("NF4 base, offloaded (pinned)", t.get("nf4_host", 0), "modelled",
                       "codes + constants of every block")] * bool(k.offload_base))  # fmt: skip
    notes += _pipeline_notes(shape, k, t)
    if shape.attn_impl != "varlen":
        notes.append(f"attention runs transformers' {shape.attn_impl} path (sliding window / soft-capping): "
                     "T² terms per block")
    if k.gpus > 1:
        notes.append(f"per GPU, with {k.gpus} processes ({k.strategy}); host RAM for all {k.gpus} processes of a node")
        for c in comps:
            if c.phase == "host":
                c.bytes *= k.gpus
    host = sum(c.bytes for c in comps if c.phase == "host")
    return Plan(shape.name, k, comps, capacity, margin, peak, phase, total, host, t["paged"], notes, t)


def block_weight_bytes(shape: shapes.ModelShape, k: Knobs) -> tuple[int, int]:
    """(bf16 bytes, NF4 bytes with constants) of one decoder block's linear weights: what the weight
    pipeline dequantizes per block, and what an offloaded base copies per block."""
    elems = [x.in_features * x.out_features for x in shape.linears]
    return BF16 * sum(elems), sum(sum(nf4_tensor_bytes(n, k.blocksize, k.double_quant)) for n in elems)


def _pipeline_parts(shape: shapes.ModelShape, k: Knobs, comps: list[Component], t: dict) -> list[Component]:
    """The weight pipeline's double buffer (`quant.pipeline`: 2 slots, each the largest block's
    weights in bf16); with an offloaded base, the NF4 weights row becomes the two staging rows the
    blocks are copied into, and t["nf4_host"] the bytes kept in host memory."""
    if not k.weight_pipeline:
        return []
    bf16, nf4 = block_weight_bytes(shape, k)
    slots = train_weights.SLOTS
    t["double_buffer"] = _r(slots * bf16, k.device)
    rows = [Component(f"weight pipeline: {slots} x the largest block's bf16 weights", t["double_buffer"], "persistent",
                      "modelled", f"one block {fmt_bytes(bf16)}, dequantized one block ahead")]
    if k.offload_base:
        t["nf4_host"], t["weights"] = t["weights"], _r(slots * nf4, k.device)
        comps[0] = Component(f"NF4 staging: {slots} blocks' codes + constants (base offloaded)", t["weights"],
                             "persistent", "modelled", f"one block {fmt_bytes(nf4)}; the base is in host RAM")
    return rows


def _pipeline_notes(shape: shapes.ModelShape, k: Knobs, t: dict) -> list[str]:
    """What the weight pipeline costs per optimizer step: dequantize passes, and with an offloaded
    base the PCIe bytes and the step time they bound (t["pcie_bytes"], t["pcie_seconds"])."""
    if not k.weight_pipeline:
        return []
    L = shape.layers
    loads = train_weights.block_loads(L) * k.grad_accum
    per_call = (3 if k.checkpointing else 2) * L * k.grad_accum
    notes = [f"weight pipeline: {loads} block dequantize passes per optimizer step ({k.grad_accum} x forward + "
             f"backward of {L} blocks; the recompute shares the backward's), {per_call} without it"]
    if k.offload_base:
        _, nf4 = block_weight_bytes(shape, k)
        t["pcie_bytes"] = loads * nf4
        t["pcie_seconds"] = t["pcie_bytes"] / PCIE_BYTES_PER_S
        tokens = k.batch * k.seq * k.grad_accum
        bound = "every block stays in the slots"
        if loads:
            bound = f"the step takes at least {t['pcie_seconds']:.2f} s, at most {tokens / t['pcie_seconds']:,.0f} tokens/s"
        notes.append(f"base offloaded: {fmt_bytes(t['pcie_bytes'])} cross PCIe per optimizer step ({loads} block "
                     f"copies of {fmt_bytes(nf4)}); at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s (PCIE_BYTES_PER_S) {bound}")
    return notes


def choose_weights(shape: shapes.ModelShape, k: Knobs, capacity: int | None, margin: float) -> Plan:
    """The plan with "auto" (and impossible) weight settings decided, and a note saying what and why.

    Off under FSDP (it gathers the blocks itself) and for a 16-bit base. offload_base auto: on
    CUDA, when the weights do not fit: the NF4 base, the 16-bit parameters, the double buffer and
    the CUDA context above the usable memory. weight_pipeline auto: on CUDA, on when the plan with
    it fits and leaves the paged optimizer states resident beside it (always with an offloaded
    base, which needs it); batch and sequence are chosen first (the solver's searches see the
    plan without it when it does not fit), since a longer M shrinks what the dequantize costs."""
    fsdp = k.gpus > 1 and k.strategy == "fsdp"
    plain = replace(k, weight_pipeline=False, offload_base=False)
    if fsdp or k.base != "nf4":
        p = plan_knobs(shape, plain, capacity, margin)
        p.notes.append("weight pipeline: off " + ("under FSDP (it gathers each block itself)" if fsdp else
                                                 f"(the base is {k.base})"))
        return p
    usable = None if capacity is None else int(capacity * (1 - margin))
    off = k.offload_base
    why_off = ""
    if off == "auto" and k.device != "cuda":
        off, why_off = False, "offload_base auto: off on the CPU"
    elif off == "auto":
        bf16, _ = block_weight_bytes(shape, k)
        resident = sum(c.bytes for c in weight_parts(shape, k)) + train_weights.SLOTS * bf16 + CUDA_CONTEXT
        off = usable is not None and resident > usable
        why_off = (f"offload_base auto: {'on' if off else 'off'}: the weights ({fmt_bytes(resident)} with the buffer "
                   f"and the CUDA context) {'do not fit' if off else 'fit'}")
        why_off += f" {fmt_bytes(usable)} usable" if usable else ""
    pipe = True if off else k.weight_pipeline
    if pipe == "auto":
        if k.device == "cuda":
            p = plan_knobs(shape, replace(k, weight_pipeline=True, offload_base=off), capacity, margin)
            if p.fits and (capacity is None or p.total + p.paged_bytes <= capacity):
                p.notes.append("weight_pipeline auto: on: the plan has room for its buffer"
                               + f"; {why_off}" * bool(why_off))
                return p
            why = f"off: no room for its {fmt_bytes(p.terms['double_buffer'])} buffer beside this plan"
        else:
            why = "off on the CPU"
        p = plan_knobs(shape, replace(k, weight_pipeline=False, offload_base=off), capacity, margin)
        p.notes.append(f"weight_pipeline auto: {why}" + f"; {why_off}" * bool(why_off))
        return p
    p = plan_knobs(shape, replace(k, weight_pipeline=bool(pipe), offload_base=bool(off)), capacity, margin)
    if why_off:
        p.notes.append(why_off)
    return p


def _distributed(comps: list[Component], t: dict, shape: shapes.ModelShape, k: Knobs) -> tuple[list, list]:
    """What several processes change, per GPU: DDP adds its gradient buckets (a copy of the LoRA
    gradients); FSDP divides the weights, adapters and optimizer state by the number of processes
    (each persistent row becomes one shard) and gathers two blocks at a time (the one computing and
    the next, prefetched), the root's parameters during the forward, and one block's unsharded
    gradients before their reduce-scatter. Returns the rows to add to the forward and backward."""
    if k.gpus <= 1:
        return [], []
    if k.strategy == "ddp":
        comps.append(Component("DDP gradient buckets (a copy of the LoRA grads)", t["grads"], "persistent", "modelled"))
        return [], []
    n, L = k.gpus, shape.layers
    block = (t["weights"] + BF16 * L * shape.block_dense_elems + t["lora"]) // L
    root = BF16 * shape.outer_dense_elems
    for c in comps:
        if c.phase == "persistent" and c.name != "cuBLAS workspace":
            c.bytes = -(-c.bytes // n)
            c.note = (c.note + "; " if c.note else "") + f"1/{n}: an FSDP shard"
    for key in ("weights", "dense", "lora", "optimizer"):
        t[key] = -(-t[key] // n)
    gathered = ("FSDP: two blocks gathered (computing + prefetched)", 2 * block, "modelled", "NF4 codes, scales, norms, LoRA")
    fwd = [gathered, ("FSDP: the root's parameters gathered (embeddings, final norm, head)", root - -(-root // n),
                      "modelled")]  # fmt: skip
    bwd = [gathered, ("FSDP: one block's LoRA grads unsharded + reduce-scatter output", 2 * t["lora"] * n // L, "modelled")]
    return fwd, bwd


def plan_memory(cfg: RunConfig, model, device_bytes: int | None = None, device: str = "cuda",
                margin: float = 0.05, gpus: int = 1) -> Plan:
    """The memory plan of `cfg` for `model` (preset name, config dict/object, config.json or checkpoint dir).

    `device_bytes`: the GPU's capacity (None: no verdict). `device`: "cuda" plans the GPU paths,
    "cpu" the CPU ones (what `scripts/validate_plan.py` measures)."""
    return plan_knobs(shapes.load_shape(model), knobs_from(cfg, device, gpus), device_bytes, margin)


def recipe_choice(cfg: RunConfig, model, device, processes: int = 1) -> tuple[bool, bool, str]:
    """What a recipe's "auto" weight settings become on `device` (a torch.device): this plan's choice
    against the GPU's total memory. Registered with `train.weights` below."""
    import torch

    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    p = plan_memory(cfg, model, capacity, device.type, gpus=processes)
    said = [n for n in p.notes if n.startswith(("weight_pipeline auto", "offload_base auto"))]
    return bool(p.knobs.weight_pipeline), bool(p.knobs.offload_base), "; ".join(said) or "the memory plan"


train_weights.register_planner(recipe_choice)
