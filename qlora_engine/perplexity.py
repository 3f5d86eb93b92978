"""Perplexity of a causal LM on plain text, in fixed non-overlapping token windows."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def token_windows(tokenizer, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """[n, window] token ids: the text tokenized once, cut into full windows (the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Mean next-token NLL over every predicted position of every window, and its exp."""
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count, "windows": windows.shape[0]}
