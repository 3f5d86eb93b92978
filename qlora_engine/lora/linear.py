"""The LoRA linear layer and its autograd function: one fused forward/backward per adapted layer.

`_LoraMatmul` computes the frozen base matmul (through the 4-bit ops for an `NF4Linear`, so the
CUDA kernels apply) and the low-rank update together, and saves only the input, h = x·Aᵀ and the
dropout mask (on CUDA only its seed): never a dequantized weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.linear import autocast_input, base_backward, base_forward
from .layers import LoraLayer


# One generator per device, reseeded per call, so a mask can be regenerated from its seed.
_GENERATORS: dict[torch.device, torch.Generator] = {}


def keep_mask(shape, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability 1 - p, a pure function of the seed."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    if device.type != "cpu":
        return torch.rand(shape, device=device, generator=gen) >= p
    # On the CPU the generator is the cost: one int32 draw, uniform on [0, 2^31), gives two masks,
    # its low 16 bits and its next 15 (p resolved to 1/32768), for a third of the time of rand().
    n = math.prod(shape)
    r = torch.empty((n + 1) // 2, dtype=torch.int32).random_(generator=gen)
    keep = torch.stack([(r & 0xFFFF) >= round(p * 65536), (r >> 16) >= round(p * 32768)], dim=1)
    return keep.view(-1)[:n].view(shape)


def _dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


class LoraLinear(LoraLayer):
    """A frozen base linear (NF4Linear or nn.Linear) plus a trainable low-rank update.

    y = base(x) + scaling · dropout(x) · Aᵀ · Bᵀ, A [r, in] Kaiming-uniform, B [out, r] zero, so the
    adapted layer starts equal to the base. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    """

    kind = "linear"

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.bfloat16, merge_on_eval: bool = False):  # fmt: skip
        super().__init__(base, r, alpha, dropout, use_rslora, merge_on_eval)
        self.in_features, self.out_features = base.in_features, base.out_features
        a, b = self.initial_values(base.weight.device)
        self.lora_A, self.lora_B = nn.Parameter(a.to(dtype)), nn.Parameter(b.to(dtype))

    def initial_values(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) at the start, float32: A Kaiming-uniform (nn.Linear's and PEFT's default), B zero."""
        a = torch.empty(self.r, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a, torch.zeros(self.out_features, self.r, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        if self.merged:
            return base_forward(self.base_layer, x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        seed = None
        if self.training and self.lora_dropout > 0:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))  # the global CPU RNG: checkpoints restore it
        y = _LoraMatmul.apply(x.reshape(-1, self.in_features), self.lora_A, self.lora_B, self, seed)
        return y.view(*x.shape[:-1], self.out_features)


class _LoraMatmul(torch.autograd.Function):
    """y = x·Wᵀ (+b) + s·(d(x)·Aᵀ)·Bᵀ for a frozen base W, trainable A [r, k], B [n, r].

    d(x) = x ⊙ m, with m the dropout mask scaled by 1/(1-p) (m = 1 without dropout). With
    h = d(x)·Aᵀ [M, r] and g = dL/dy [M, n]:
      dL/dB = s · gᵀ·h                  [n, r]
      dL/dA = s · (g·B)ᵀ·d(x)           [r, k]
      dL/dx = g·W + (s · (g·B)·A) ⊙ m   [M, k]
    Saved: x, h, and the dropout mask: on CUDA only its seed (the mask is regenerated, costing no
    memory), on the CPU the bool mask itself (random numbers cost more there than bytes).
    Never the dequantized W. Computation runs in x's dtype; gradients come in each parameter's dtype.
    """

    @staticmethod
    def forward(ctx, x, A, B, layer, seed):
        dt = x.dtype
        y = base_forward(layer.base_layer, x)
        keep = None if seed is None else keep_mask(x.shape, layer.lora_dropout, seed, x.device)
        xd = x if keep is None else _dropout(x, keep, layer.lora_dropout)
        h = xd @ A.to(dt).t()
        y = y + (h @ B.to(dt).t()) * layer.scaling
        stored = keep if keep is not None and not x.is_cuda else None
        ctx.save_for_backward(x, h, A, B, stored)
        ctx.layer, ctx.seed = layer, seed
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, A, B, keep = ctx.saved_tensors
        layer, s, dt, p = ctx.layer, ctx.layer.scaling, g.dtype, ctx.layer.lora_dropout
        if ctx.seed is not None and keep is None:
            keep = keep_mask(x.shape, p, ctx.seed, x.device)
        gB = (g @ B.to(dt)) * s
        dA = dB = dx = None
        if ctx.needs_input_grad[2]:
            dB = ((g.t() @ h.to(dt)) * s).to(B.dtype)
        if ctx.needs_input_grad[1]:
            dA = (gB.t() @ (x if keep is None else _dropout(x, keep, p))).to(A.dtype)
        if ctx.needs_input_grad[0]:
            lora_dx = gB @ A.to(dt)
            dx = base_backward(layer.base_layer, g) + (lora_dx if keep is None else _dropout(lora_dx, keep, p))
        return dx, dA, dB, None, None
