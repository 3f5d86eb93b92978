"""The frozen NF4 linear layer, and the frozen-base forward/backward that adapted layers call.

Its 4-bit matmuls run through the custom ops (`ops.matmul_4bit` forward, `ops.matmul_4bit_t`
backward), so the CUDA kernels apply when they are loaded. No dequantized weight is kept alive
between forward and backward, unless a `pipeline.WeightPipeline` runs: it sets `layer.pipeline`, and
the matmuls then multiply with the block's weight it dequantized ahead into its buffer.
"""

from __future__ import annotations

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
        if self.pipeline is not None:
            self.pipeline.invalidate()

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

    pipeline = None  # the pipeline.WeightPipeline holding this layer's dequantized weight, when one runs

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x · Wᵀ (+ bias), no autograd: the forward of this layer for a 2-D input."""
        w = None if self.pipeline is None else self.pipeline.weight(self, x2d)
        y = ops.matmul_4bit(x2d, *self._args()) if w is None else x2d @ w.t()  # the reference op's own arithmetic
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def matmul_t(self, dy2d: torch.Tensor) -> torch.Tensor:
        """dy · W, no autograd: the input gradient of this layer for a 2-D output gradient."""
        w = None if self.pipeline is None else self.pipeline.weight(self, dy2d)
        return ops.matmul_4bit_t(dy2d, *self._args()) if w is None else dy2d @ w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
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


def autocast_input(x: torch.Tensor) -> torch.Tensor:
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
