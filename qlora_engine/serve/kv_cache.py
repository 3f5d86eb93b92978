"""The server's KV cache: one transformers `DynamicCache` per sequence, the attention that reads it
row by row, and rotary embeddings computed row by row.

Prompts are prefilled together, left-padded to the longest ([k, T]); decode steps run every
running sequence as one batch [B, 1]. In both, `RowCaches.update` appends each row's new keys and
values (a prefill: only its real tokens) to that row's own cache, and `rows_attention` attends each
row's real queries to its own keys with the SDPA call transformers' `generate` makes for one
sequence (causal in a prefill, all of the cache in a decode step). `RowRotary` computes each row's
cos/sin from its own positions alone, as `generate` does. A row's padding is never attended to, and
no row's arithmetic depends on another row's length: its logits are those of the sequence run
alone, bit for bit. Only attention and rotary run per row; every linear layer (the bulk of a step)
runs once for the whole batch. Touches the model only to select this attention and wrap its
rotary embeddings (`prepare_model`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..models.structure import replace_module
from .rows import Rows

ATTENTION = "qlora_serve_rows"


class RowKeys(list):
    """Per-row keys, plus where each row's real queries start (None in a decode step)."""

    def __init__(self, keys, starts: list[int] | None):
        super().__init__(keys)
        self.starts = starts


class RowCaches:
    """The caches of the rows of one batch, in row order, passed as the model's `cache` argument."""

    def __init__(self, caches: list, starts: list[int] | None = None):
        self.caches, self.starts = caches, starts

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for b, cache in enumerate(self.caches):
            s = 0 if self.starts is None else self.starts[b]
            k, v = cache.update(key_states[b : b + 1, :, s:], value_states[b : b + 1, :, s:], layer_idx)
            keys.append(k)
            values.append(v)
        return RowKeys(keys, self.starts), values


def rows_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, once per row when the keys come from `RowCaches`; the padded
    query positions of a prefill get zeros (their outputs are never used)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, RowKeys):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = key.starts or [0] * len(key)
    outs = [sdpa_attention_forward(module, query[b : b + 1, :, s:], key[b], value[b], None, **kwargs)[0]
            for b, s in enumerate(starts)]  # fmt: skip
    if not any(starts):
        return torch.cat(outs), None
    out = outs[0].new_zeros(len(outs), query.shape[2], *outs[0].shape[2:])
    for b, (s, o) in enumerate(zip(starts, outs)):
        out[b, s:] = o[0]
    return out, None


class RowRotary(nn.Module):
    """A model's rotary embedding, computed for each row from its real positions only. Elementwise
    kernels compute the end of a tensor that does not fill a vector register with scalar code,
    whose cos/sin may differ from the vector code's in the last bit; row by row, each row's cos/sin
    is the one `generate` computes for that sequence."""

    def __init__(self, inner: nn.Module, rows: Rows):
        super().__init__()
        self.inner, self.rows = inner, rows

    def forward(self, x, position_ids, *args, **kwargs):
        starts = self.rows.starts or [0] * position_ids.shape[0]
        if position_ids.shape[0] == 1 and not starts[0]:
            return self.inner(x, position_ids, *args, **kwargs)
        parts = [self.inner(x[b : b + 1], position_ids[b : b + 1, s:], *args, **kwargs) for b, s in enumerate(starts)]
        out = []
        for j in range(len(parts[0])):
            pieces = [p[j] for p in parts]
            if any(starts):
                full = pieces[0].new_zeros(len(pieces), position_ids.shape[1], *pieces[0].shape[2:])
                for b, (s, t) in enumerate(zip(starts, pieces)):
                    full[b, s:] = t[0]
                out.append(full)
            else:
                out.append(torch.cat(pieces))
        return tuple(out)


def prepare_model(model: nn.Module, rows: Rows) -> None:
    """Make `model` attend row by row (`rows_attention`, registered with transformers, which then
    builds no mask: a prefill row is causal through SDPA's is_causal, as without a mask in
    `generate`, and a decode row attends to all of its own cache) and compute rotary embeddings row
    by row."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, rows_attention)
    model.set_attn_implementation(ATTENTION)
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RotaryEmbedding") and not isinstance(m, RowRotary):
            replace_module(model, name, RowRotary(m, rows))


def new_cache(model: nn.Module):
    """An empty cache for one sequence: what `generate` makes for a prompt."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_argument(model: nn.Module) -> str:
    """The name under which this transformers version's forward takes the cache."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def context_length(model: nn.Module) -> int:
    """The longest sequence (prompt + answer) the server runs: the model's positions, and no more
    than a sliding window, since row attention attends to the whole of a row's cache."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        n = min(n, int(window))
    return n
