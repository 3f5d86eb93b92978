"""The frozen NF4 linear layer and the LoRA-adapted linear, with their autograd functions.

Both run their 4-bit matmuls through the custom ops (`ops.matmul_4bit` forward, `ops.matmul_4bit_t`
backward), so the CUDA kernels apply when they are loaded. Neither keeps a dequantized weight alive
between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import nf4, ops


class NF4Linear(nn.Module):
    """A frozen linear layer, weight packed in 4 bits in bnb's layout; optional 16-bit bias.

    Its state dict uses the bnb/transformers keys: `weight` (packed uint8), `weight.absmax`,
    `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4`, and `bias`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        n = in_features * out_features
        self.register_buffer("weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", None, persistent=False)
        self.register_buffer("quant_map", None, persistent=False)
        self.register_buffer("nested_absmax", None, persistent=False)
        self.register_buffer("nested_quant_map", None, persistent=False)
        self.blocksize = 64
        self.quant_type = "nf4"
        self.offset = 0.0
        self.weight_dtype = dtype  # dtype of the weight before quantization (recorded in the state)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    quant_type: str = "nf4", double_quant: bool = True) -> "NF4Linear":
        """Quantize a dense [out, in] weight (on its own device)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
        packed, state = ops.quantize_weight(weight, blocksize, quant_type, double_quant)
        layer.set_quantized(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def set_quantized(self, packed: torch.Tensor, state: nf4.QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, layer expects {(self.out_features, self.in_features)}")
        self.weight = packed.view(torch.uint8).reshape(-1, 1)
        self.absmax = state.absmax
        self.quant_map = state.code
        self.nested_absmax = state.nested_absmax
        self.nested_quant_map = state.nested_code
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.offset = state.offset
        self.weight_dtype = state.dtype

    def quant_state(self) -> nf4.QuantState:
        return nf4.QuantState(
            absmax=self.absmax, shape=(self.out_features, self.in_features), code=self.quant_map,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
            nested_absmax=self.nested_absmax, nested_code=self.nested_quant_map, offset=self.offset,
        )  # fmt: skip

    def _args(self):
        return (self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map,
                self.offset, self.blocksize, self.out_features, self.in_features)  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The exact dequantized weight [out, in]."""
        return ops.dequantize_4bit(self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map,
                                   self.offset, self.blocksize, [self.out_features, self.in_features],
                                   dtype or self.weight_dtype)  # fmt: skip

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x · Wᵀ (+ bias), no autograd: the forward of this layer for a 2-D input."""
        y = ops.matmul_4bit(x2d, *self._args())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def matmul_t(self, dy2d: torch.Tensor) -> torch.Tensor:
        """dy · W, no autograd: the input gradient of this layer for a 2-D output gradient."""
        return ops.matmul_4bit_t(dy2d, *self._args())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        y = _FrozenMatmul.apply(x.reshape(-1, self.in_features), self)
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        for k, v in self.quant_state().state_dict("weight").items():
            destination[prefix + k] = v
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        try:
            state = nf4.QuantState.from_state_dict(mine, "weight")
        except ValueError as e:
            error_msgs.append(str(e))
            return
        self.set_quantized(state_dict[prefix + "weight"], state)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].clone(), requires_grad=False)
            else:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        dq = "+dq" if self.nested_absmax is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.quant_type}{dq}, blocksize={self.blocksize}"


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Custom autograd functions are outside autocast: cast the input as autocast would."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def base_forward(base: nn.Module, x2d: torch.Tensor) -> torch.Tensor:
    """Forward of a frozen base layer (NF4Linear or nn.Linear), no autograd."""
    if isinstance(base, NF4Linear):
        return base.matmul(x2d)
    return F.linear(x2d, base.weight.to(x2d.dtype), None if base.bias is None else base.bias.to(x2d.dtype))


def base_backward(base: nn.Module, dy2d: torch.Tensor) -> torch.Tensor:
    """Input gradient of a frozen base layer: dy · W."""
    if isinstance(base, NF4Linear):
        return base.matmul_t(dy2d)
    return dy2d @ base.weight.to(dy2d.dtype)


class _FrozenMatmul(torch.autograd.Function):
    """y = x · Wᵀ + b with W and b frozen.

    Gradient: dL/dx = dL/dy · W. Nothing is saved for backward: the packed weight is read again
    (dequantized by the reference kernel, or used in place by the CUDA kernel).
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, dy):
        return ctx.layer.matmul_t(dy), None


# One generator per device, reseeded per call, so a mask can be regenerated from its seed.
_GENERATORS: dict[torch.device, torch.Generator] = {}


def _keep_mask(shape, p: float, seed: int, device: torch.device) -> torch.Tensor:
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


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoraLinear(nn.Module):
    """A frozen base linear (NF4Linear or nn.Linear) plus a trainable low-rank update.

    y = base(x) + scaling · dropout(x) · Aᵀ · Bᵀ, A [r, in] Kaiming-uniform, B [out, r] zero, so the
    adapted layer starts equal to the base. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        device = base.weight.device
        a = torch.empty(r, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and PEFT's) default for lora_A
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        seed = None
        if self.training and self.lora_dropout > 0:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))  # the global CPU RNG: checkpoints restore it
        y = _LoraMatmul.apply(x.reshape(-1, self.in_features), self.lora_A, self.lora_B, self, seed)
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B · A in float32 [out, in]: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, rslora={self.use_rslora}"


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
        keep = None if seed is None else _keep_mask(x.shape, layer.lora_dropout, seed, x.device)
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
            keep = _keep_mask(x.shape, p, ctx.seed, x.device)
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
