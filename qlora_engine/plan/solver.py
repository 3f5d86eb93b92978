"""The solver: the largest batch size, sequence length or LoRA rank whose plan fits a GPU, what
would make a plan that does not fit, fit, and the two calls a run makes around training:
`resolve_auto` (replace "auto" settings before anything is loaded) and `peak_report` (predicted
against measured peak at the end).
"""

from __future__ import annotations

from dataclasses import replace

from ..machine import fmt_bytes
from ..train.config import RunConfig
from . import gpus, shapes
from .memory import RANKS, Knobs, Plan, PlanError, check_settings, knobs_from, plan_knobs, plan_memory

def _largest(fits, lo: int, hi: int) -> int | None:
    """The largest x in [lo, hi] with fits(x), for a monotone fits (True then False); None if none."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggestions(shape: shapes.ModelShape, k: Knobs, capacity: int, margin: float = 0.05) -> list[str]:
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
    fsdp = k.gpus > 1 and k.strategy == "fsdp"
    if k.weight_pipeline is True and k.offload_base is not True:
        tries.append(("weight_pipeline false", replace(k, weight_pipeline=False)))
    if k.device == "cuda" and k.base == "nf4" and k.offload_base is not True and not fsdp:
        tries.append(("offload_base true (the base in host RAM, PCIe-bound)", replace(k, offload_base=True)))
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
          device: str = "cuda", max_batch: int = 1024, gpus: int = 1) -> tuple[RunConfig, Plan, str]:
    """Choose what `maximize` names ("batch", "seq_len" or "rank") as large as fits `device_bytes`.

    An "auto" seq_len is chosen first: the longest multiple of 128 that fits at the given batch
    (1 if auto), capped by the model's max_position_embeddings; then "rank" picks the largest of
    RANKS, and the batch is maximized when it is auto or `maximize` is "batch". Every candidate is
    planned in full and only a plan that fits is returned.
    Returns (the config with the choices, their plan, a one-paragraph explanation); raises
    PlanError saying what would fit when even the smallest setting does not."""
    shape = shapes.load_shape(model)
    if maximize not in ("batch", "seq_len", "rank"):
        raise PlanError(f"maximize must be batch, seq_len or rank, got {maximize!r}")
    b0 = 1 if cfg.batch_size == "auto" else int(cfg.batch_size)
    max_seq = shape.max_positions or 131072
    k = knobs_from(cfg.replace(batch_size=b0, seq_len=min(max_seq, 512) if cfg.seq_len == "auto" else cfg.seq_len),
                   device, gpus)
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
# around a run


def resolve_auto(cfg: RunConfig, model, device) -> tuple[RunConfig, Plan, str]:
    """Before a run loads anything: replace batch_size / seq_len "auto" by the solver's choice for
    `device` (a torch.device; CUDA: its total memory; CPU: the host RAM available now), and return
    the plan of the final settings, to compare with the measured peak at the end."""
    from .. import machine

    kind = "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    if kind == "cuda":
        import torch

        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = machine.available_ram()
    if cfg.batch_size != "auto" and cfg.seq_len != "auto":
        p = plan_memory(cfg, model, capacity, kind)
        return cfg, p, f"memory plan: {p.verdict()}"
    new_cfg, p, why = solve(cfg, model, capacity, default_target(cfg), device=kind)
    return new_cfg, p, f"auto settings: {why}"


def peak_report(plan: Plan, device, host_baseline: int = 0) -> str:
    """One line for the end of a run: the predicted peak against the measured one. On CUDA, torch's
    max_memory_allocated; on the CPU, the process's peak RSS against `host_baseline` (the RSS before
    the model was loaded: Python, torch, the tokenizer) plus the plan's tensors."""
    from .. import machine

    if getattr(device, "type", str(device)) != "cuda":
        predicted = host_baseline + plan.peak_allocated
        got = machine.peak_rss()
        err = (predicted - got) / max(got, 1)
        return (f"memory: predicted peak RSS {fmt_bytes(predicted)} ({fmt_bytes(host_baseline)} before loading + "
                f"{fmt_bytes(plan.peak_allocated)} of tensors), measured {fmt_bytes(got)} ({err:+.1%})")
    import torch

    got, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    err = (plan.peak_allocated - got) / max(got, 1)
    paged = f"; {fmt_bytes(plan.paged_bytes)} of paged optimizer state, not counted by torch" * bool(plan.paged_bytes)
    return (f"memory: predicted peak allocated {fmt_bytes(plan.peak_allocated)}, measured {fmt_bytes(got)} "
            f"({err:+.1%}); reserved {fmt_bytes(reserved)}; predicted GPU total {fmt_bytes(plan.total)} with "
            f"the CUDA context{paged}")


def plan_run(cfg: RunConfig | None = None, *, gpu: str | None = None, gpu_memory: int | str | None = None,
             maximize: str | None = None, margin: float = 0.05, device: str = "cuda", **settings) -> Plan:
    """The Python API of `qlora plan`: the plan of a run (`cfg` and/or config keys as keyword
    arguments, e.g. model="llama-3.1-8b", seq_len=2048), against `gpu` (a name from the table) or
    `gpu_memory` ("24GiB" or bytes). With `maximize` ("batch", "seq_len", "rank") or "auto"
    settings, the solver chooses them: `plan.knobs` holds the choice and the last note says why."""
    from ..machine import parse_size

    cfg = (cfg.replace(**settings) if settings else cfg) if cfg is not None else RunConfig.make(**settings)
    capacity = gpus.find_gpu(gpu).total_bytes if gpu else parse_size(gpu_memory) if gpu_memory is not None else None
    if maximize or "auto" in (cfg.batch_size, cfg.seq_len):
        if capacity is None:
            raise PlanError("choosing batch_size/seq_len/rank needs a GPU: give gpu= or gpu_memory=")
        _, p, why = solve(cfg, cfg.model, capacity, maximize or default_target(cfg), margin, device)
        p.notes.append(why)
        return p
    return plan_memory(cfg, cfg.model, capacity, device, margin)


def choose_strategy(cfg: RunConfig, model, capacity: int | None, gpus: int, margin: float = 0.05,
                    device: str = "cuda") -> tuple[str, dict[str, Plan]]:
    """With several GPUs: DDP when its plan fits with the whole base on each GPU, else FSDP when it
    fits, else DDP with the base offloaded to host RAM (offload_base auto; PCIe-bound) when that
    fits; and both plans."""
    plans = {s: plan_memory(cfg.replace(strategy=s), model, capacity, device, margin, gpus) for s in ("ddp", "fsdp")}
    ddp, fsdp = plans["ddp"], plans["fsdp"]
    if ddp.fits and ddp.knobs.offload_base is not True:
        return "ddp", plans
    return ("ddp" if ddp.fits and not fsdp.fits else "fsdp"), plans
