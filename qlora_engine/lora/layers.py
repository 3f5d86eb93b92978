"""What every adapted layer shares (`LoraLayer`), and the LoRA layers for embeddings and
convolutions. The linear one, with its own autograd function, is in `linear.py`.

An adapted layer holds its frozen `base_layer` and two trainable tensors, `lora_A` and `lora_B`,
with `delta_weight() = scaling · B·A` shaped like the base weight (PEFT's conventions, so the PEFT
on-disk format holds them as they are). As in loralib, a layer can be merged into its base
(`merge()`: W += ΔW, and the adapted path is skipped) and unmerged (`unmerge()`), and with
`merge_on_eval` it merges itself on `eval()` and unmerges on `train()`, so adapted inference costs
nothing extra. Unmerging restores the exact original weight (kept while merged) rather than
subtracting, which in 16 bits would not give it back. A 4-bit base cannot hold W + ΔW, so layers on
an `NF4Linear` never merge in place: `qlora_engine.export` merges them exactly into 16-bit weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..quant.linear import NF4Linear


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def delta_weight(kind: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · B·A in float32, shaped like the base weight of a layer of `kind`:
    linear/conv: [out, in, *kernel] (B [out, r, 1..], A [r, in, *kernel]); embedding: [num, dim]
    (A [r, num], B [dim, r])."""
    a, b = A.float(), B.float()
    if kind == "embedding":
        return scaling * (b @ a).t()
    return scaling * (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


def layer_kind(base: nn.Module) -> str | None:
    """'linear', 'embedding', 'conv' (Conv1d/Conv2d), or None for a module LoRA cannot adapt."""
    if isinstance(base, (nn.Linear, NF4Linear)):
        return "linear"
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    return None


class LoraLayer(nn.Module):
    """A frozen base layer plus a trainable low-rank update; see the module docstring. Subclasses
    define `initial_values()`: (A, B) at the start, drawn from the global RNG in a fixed order, so
    a sharded model can be initialised exactly as an unsharded one."""

    kind = "?"

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, merge_on_eval: bool):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise InputError(f"LoRA rank must be a positive whole number, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"lora_dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.merge_on_eval = merge_on_eval
        self.merged = False
        self._original: torch.Tensor | None = None
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self):
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A in float32, shaped like the base weight: what merging adds to it."""
        return delta_weight(self.kind, self.lora_A, self.lora_B, self.scaling)

    @property
    def can_merge(self) -> bool:
        return not isinstance(self.base_layer, NF4Linear)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W ← round(W + ΔW) in W's dtype; the forward then runs the base alone. `keep_original`
        keeps W for an exact `unmerge()` (without it, the merge is for good)."""
        if self.merged:
            return
        if not self.can_merge:
            raise InputError("a LoRA layer on a 4-bit base cannot be merged in place (4 bits cannot hold W + ΔW): "
                             "export the model (qlora export), which merges it exactly into 16-bit weights")  # fmt: skip
        w = self.base_layer.weight
        self._original = w.detach().clone() if keep_original else None
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._original is None:
            raise InputError("this LoRA layer was merged without keeping its original weight; it cannot be unmerged")
        self.base_layer.weight.copy_(self._original)
        self._original, self.merged = None, False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval and self.can_merge:
            self.unmerge() if mode else self.merge()
        return self

    def extra_repr(self) -> str:
        merged = ", merged" if self.merged else ""
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, rslora={self.use_rslora}{merged}"


class LoraEmbedding(LoraLayer):
    """An nn.Embedding plus scaling · onehot(x)·Aᵀ·Bᵀ, A [r, num_embeddings] zero and B
    [embedding_dim, r] normal (PEFT's and loralib's initialisation: zero update at the start).
    No dropout: a dropped one-hot input would drop the whole token."""

    kind = "embedding"

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, merge_on_eval: bool = False):  # fmt: skip
        super().__init__(base, r, alpha, 0.0, use_rslora, merge_on_eval)
        a, b = self.initial_values(base.weight.device)
        self.lora_A, self.lora_B = nn.Parameter(a.to(dtype)), nn.Parameter(b.to(dtype))

    def initial_values(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) at the start, float32: A zero, B standard normal."""
        b = torch.empty(self.base_layer.embedding_dim, self.r, dtype=torch.float32, device=device)
        nn.init.normal_(b)
        return torch.zeros(self.r, self.base_layer.num_embeddings, dtype=torch.float32, device=device), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        e = self.base_layer
        h = F.embedding(x, self.lora_A.t(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return y + (h @ self.lora_B.t().to(h.dtype)).to(y.dtype) * self.scaling


class LoraConv(LoraLayer):
    """An nn.Conv1d/Conv2d plus scaling · B(A(dropout(x))): A a convolution like the base's (same
    kernel, stride, padding, dilation) to r channels, B a 1x1 convolution to the output channels
    (PEFT's layout). A Kaiming-uniform, B zero."""

    kind = "conv"

    def __init__(self, base: nn.Conv1d | nn.Conv2d, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32, merge_on_eval: bool = False):  # fmt: skip
        if base.groups != 1:
            raise InputError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported")
        if base.padding_mode != "zeros":
            raise InputError(f"LoRA on a convolution with padding_mode={base.padding_mode!r} is not supported")
        super().__init__(base, r, alpha, dropout, use_rslora, merge_on_eval)
        a, b = self.initial_values(base.weight.device)
        self.lora_A, self.lora_B = nn.Parameter(a.to(dtype)), nn.Parameter(b.to(dtype))
        self.conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def initial_values(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) at the start, float32: A Kaiming-uniform, B zero."""
        c = self.base_layer
        a = torch.empty(self.r, c.in_channels, *c.kernel_size, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a, torch.zeros(c.out_channels, self.r, *([1] * len(c.kernel_size)), dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        c = self.base_layer
        h = self.conv(self.drop(x).to(self.lora_A.dtype), self.lora_A, None, c.stride, c.padding, c.dilation)
        return y + self.conv(h, self.lora_B).to(y.dtype) * self.scaling
