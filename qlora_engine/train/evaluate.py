"""Measuring a model's next-token loss: on eval batches during training, and as perplexity on plain
text in fixed windows.

Both go through one function, `evaluate`, which runs the training loss (`loss.causal_lm_loss`:
only target positions projected through `lm_head`, in chunks) without gradients, so the number a
run reports and the perplexity of a checkpoint are computed the same way. Where logits exist anyway
(the export's fidelity report compares them), `sum_nll` takes them directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .loss import causal_lm_loss

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def autocast(device: torch.device):
    """The compute dtype of training and eval: bf16 autocast on CUDA, the weights' own dtypes elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: torch.device, chunk: int = 1024, eval_mode: bool = True) -> dict:
    """Mean loss over every target token of the batches, and its perplexity. Touches no RNG.
    `eval_mode`: switch the model to eval() for it (LoRA dropout off); False keeps its mode (a
    bitsandbytes model on the CPU must stay in train mode: its eval mode repacks the weights)."""
    was_training = model.training
    if eval_mode:
        model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast(device):
                loss, n = causal_lm_loss(model, b, chunk=chunk)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def token_windows(tokenizer, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """[n, window] token ids: the text tokenized once, cut into full windows (the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


def window_batches(windows: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """Batches in the training format (`data.collate`'s keys): every next token is a target."""
    out = []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = ids[:, 1:]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        out.append({"input_ids": ids, "targets": targets, "position_ids": pos})
    return out


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Mean next-token NLL over every predicted position of every window, and its exp (the model
    stays in the mode it is in)."""
    device = next(p for p in model.parameters()).device
    r = evaluate(model, window_batches(windows, batch_size), device, eval_mode=False)
    return {"nll": r["eval_loss"], "ppl": math.exp(r["eval_loss"]), "tokens": r["eval_tokens"], "windows": windows.shape[0]}


def sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p(target), number of targets) from logits [..., V] and targets [...] (IGNORE skipped), in fp32."""
    flat = targets.reshape(-1)
    keep = flat != IGNORE
    if not bool(keep.any()):
        return 0.0, 0
    lg = logits.reshape(-1, logits.shape[-1])[keep].float()
    return float(F.cross_entropy(lg, flat[keep], reduction="sum", ignore_index=IGNORE).double()), int(keep.sum())
