"""Attention for packed rows: each sample's causal attention computed on its own ("varlen").

A packed row holds several samples; the usual way to keep them apart is a block-diagonal mask over
the whole row, which still costs T² per row. Here the samples are found from `position_ids` (each
one restarts at 0) and attended separately with `is_causal=True`, which costs Σ len² and can leak
nothing. Anything else (a padding mask, a KV cache, attention dropout, soft-capping) goes to
transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "qlora_varlen"
_cache: dict = {"key": None, "segments": None}


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the (start, end) of each run of positions that starts at 0. Computed once
    per forward pass (every layer gets the same position_ids tensor)."""
    key = (position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape))
    if _cache["key"] != key:
        pos = position_ids.cpu()
        out = []
        for row in pos:
            starts = (row == 0).nonzero().view(-1).tolist() or [0]
            if starts[0] != 0:
                starts = [0] + starts
            ends = starts[1:] + [row.numel()]
            out.append(list(zip(starts, ends)))
        _cache.update(key=key, segments=out)
    return _cache["segments"]


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (attention_mask is not None or position_ids is None or dropout > 0 or kwargs.get("softcap") is not None
             or query.shape[2] != key.shape[2] or getattr(module, "sliding_window", None))  # fmt: skip
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(query.shape[0], -1)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, segs in enumerate(_segments(position_ids)):
        parts = [F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                                is_causal=True, scale=scaling, enable_gqa=gqa) for s, e in segs]  # fmt: skip
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """No 4D mask unless there is padding: the samples are separated by position_ids instead."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen(model) -> bool:
    """Switch a transformers model to this attention; False (model unchanged) where it does not apply."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    cfg = model.config
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None) or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
    try:
        model.set_attn_implementation(NAME)
    except Exception:  # an architecture that only allows its own implementations
        return False
    return True
