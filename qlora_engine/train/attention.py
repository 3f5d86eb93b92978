"""Attention for packed rows: each sample's causal attention computed on its own ("varlen").

A packed row holds several samples; the usual way to keep them apart is a block-diagonal mask over
the whole row, which still costs T² per row. Here the samples are found from `position_ids` (each
one restarts at 0) and attended separately, causally, which costs Σ len² and can leak nothing. On
CUDA (bf16/fp16) all samples of the batch go to one flash varlen call, with cumulative sample
lengths built from `position_ids` (`cu_seqlens`): `torch.nn.attention.varlen.varlen_attn`, or
flash_attn's `flash_attn_varlen_func` where torch lacks it. Elsewhere each sample is one SDPA call
with `is_causal=True` (exact: a packed sample's logits equal its logits alone). Anything else (a
padding mask, a KV cache, attention dropout, soft-capping) goes to transformers' own SDPA path
unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "qlora_varlen"
_cache: dict = {"key": None, "segments": None, "cu": {}}


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
        _cache.update(key=key, segments=out, cu={})
    return _cache["segments"]


def cu_seqlens(position_ids: torch.Tensor, device=None) -> tuple[torch.Tensor, int]:
    """(int32 [samples + 1] cumulative sample lengths over the flattened [B * T] batch, the longest
    sample): the samples `_segments` finds, row after row; on `device` (once per forward pass)."""
    segs = _segments(position_ids)
    device = torch.device(device or position_ids.device)
    if device not in _cache["cu"]:
        T = position_ids.shape[-1]
        bounds = [0] + [b * T + e for b, row in enumerate(segs) for _, e in row]
        longest = max(e - s for row in segs for s, e in row)
        _cache["cu"][device] = (torch.tensor(bounds, dtype=torch.int32).to(device), longest)
    return _cache["cu"][device]


def _torch_varlen(q, k, v, cu, longest, scale):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip


def _flash_attn_varlen(q, k, v, cu, longest, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)


@functools.cache
def flash_kernel():
    """The flash varlen kernel this torch has (torch's own first, then flash_attn's), or None
    (looked up once: attention asks on every call)."""
    import importlib.util

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        return _torch_varlen
    except ImportError:
        return _flash_attn_varlen if importlib.util.find_spec("flash_attn") else None


def use_flash(query: torch.Tensor) -> bool:
    """Whether packed rows take the one-call flash varlen path: CUDA, 16-bit, a kernel present."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and flash_kernel() is not None


def flash_varlen(query, key, value, position_ids, scaling=None, kernel=None):
    """[B, heads, T, D] q/k/v of packed rows -> [B, T, heads, D] output, every sample causal on its
    own, in one call of `kernel` (default: `flash_kernel()`) on the [B * T, heads, D] layout."""
    B, H, T, D = query.shape
    cu, longest = cu_seqlens(position_ids, query.device)
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (query, key, value))
    out = (kernel or flash_kernel())(q, k, v, cu, longest, scaling)
    return out.view(B, T, H, D)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (attention_mask is not None or position_ids is None or dropout > 0 or kwargs.get("softcap") is not None
             or query.shape[2] != key.shape[2] or getattr(module, "sliding_window", None))  # fmt: skip
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(query.shape[0], -1)
    if use_flash(query):
        return flash_varlen(query, key, value, position_ids, scaling), None
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
