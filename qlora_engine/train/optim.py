"""Optimizers and the learning-rate schedule.

On CUDA the default is bitsandbytes' paged 8-bit AdamW: optimizer state in unified memory that the
driver pages out to host RAM when the GPU is full. On the CPU bitsandbytes' paged optimizers only
warn and fall back, so the engine chooses torch's AdamW there itself and says so.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)
NAMES = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw")


def resolve(name: str, device: torch.device) -> str:
    if name == "auto":
        return "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name.startswith("paged") and device.type != "cuda":
        log.warning("%s needs CUDA; using adamw on %s", name, device.type)
        return "adamw"
    return name


def build(params, name: str, lr: float, weight_decay: float, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, the name actually used) with AdamW betas (0.9, 0.999), eps 1e-8."""
    name = resolve(name, device)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda"), name
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay), name


def warmup_steps(warmup: float, total: int) -> int:
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def schedule(optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
