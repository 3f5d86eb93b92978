"""Custom ops of the 4-bit format: schemas, fake (shape-only) kernels, and the default kernels.

The default kernel of every op is the pure-PyTorch spec from `nf4.py`; it runs on any device and is
the CPU path. When the compiled CUDA library loads (`cuda.py`, which imports this module; this one never imports
it), it registers faster kernels for the CUDA dispatch key of these same ops, so callers never ask
whether it is there. `qlora_engine.quant` loads it on import.

Weight arguments always come as the same group, in bnb's layout (see `nf4.QuantState`):
  packed       uint8 [(n*k+1)//2, 1]  codes of W [n, k] (out_features, in_features), row-major
  absmax       float32 [nblocks], or uint8 [nblocks] when double-quantized
  code         float32 [16]           the 4-bit table (NF4 or FP4)
  nested_absmax, nested_code          float32 [ceil(nblocks/256)], [256]; None when not nested
  offset       float                  the double-quant offset (0.0 when not nested)
  blocksize    int
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import nf4

NESTED_BLOCKSIZE = nf4.NESTED_BLOCKSIZE


def ref_quantize_4bit(a: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """First-level 4-bit quantization: (packed uint8 [(n+1)//2], absmax float32 [nblocks])."""
    return nf4.quantize_codes_4bit(a, code, blocksize)


quantize_4bit = torch.library.custom_op("qlora_engine::quantize_4bit", ref_quantize_4bit, mutates_args=())


@quantize_4bit.register_fake
def _(a, code, blocksize):
    n = a.numel()
    return a.new_empty((n + 1) // 2, dtype=torch.uint8), a.new_empty(-(-n // blocksize), dtype=torch.float32)


def ref_quantize_8bit(a: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization with a sorted 256-value map: (uint8 [n], absmax float32)."""
    return nf4.quantize_codes_8bit(a, code, blocksize)


quantize_8bit = torch.library.custom_op("qlora_engine::quantize_8bit", ref_quantize_8bit, mutates_args=())


@quantize_8bit.register_fake
def _(a, code, blocksize):
    n = a.numel()
    return a.new_empty(n, dtype=torch.uint8), a.new_empty(-(-n // blocksize), dtype=torch.float32)


def _absmax_f32(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: float) -> Tensor:
    if nested_absmax is None:
        return absmax
    return nf4.dequantize_absmax(absmax, nested_absmax, nested_code, offset, NESTED_BLOCKSIZE)


def ref_dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: float,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """W in `dtype`, shape `shape`: `dtype(code[c] * absmax[block])`, one rounding."""
    scales = _absmax_f32(absmax, nested_absmax, nested_code, offset)
    return nf4.dequantize_codes_4bit(packed, scales, code, blocksize, shape, dtype)


dequantize_4bit = torch.library.custom_op("qlora_engine::dequantize_4bit", ref_dequantize_4bit, mutates_args=())


@dequantize_4bit.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def ref_matmul_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: float,
    blocksize: int,
    n: int,
    k: int,
) -> Tensor:
    """Y = X · dequant(W)ᵀ for X [..., k] and W [n, k]; Y [..., n] in X's dtype.

    The spec: dequantize W to X's dtype, then one matmul (as bnb's train-mode path does).
    """
    w = dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, [n, k], x.dtype)
    return x @ w.t()


matmul_4bit = torch.library.custom_op("qlora_engine::matmul_4bit", ref_matmul_4bit, mutates_args=())


@matmul_4bit.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
    return x.new_empty((*x.shape[:-1], n))


def ref_matmul_4bit_t(
    dy: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: float,
    blocksize: int,
    n: int,
    k: int,
) -> Tensor:
    """dX = dY · dequant(W) for dY [..., n] and W [n, k]; dX [..., k] in dY's dtype (the backward of matmul_4bit)."""
    w = dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, [n, k], dy.dtype)
    return dy @ w


matmul_4bit_t = torch.library.custom_op("qlora_engine::matmul_4bit_t", ref_matmul_4bit_t, mutates_args=())


@matmul_4bit_t.register_fake
def _(dy, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
    return dy.new_empty((*dy.shape[:-1], k))


def quantize_weight(w: Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True):
    """`nf4.quantize_4bit` through the ops, so a registered CUDA kernel quantizes CUDA tensors."""
    return nf4.quantize_4bit(w, blocksize, quant_type, double_quant, first_level=quantize_4bit, second_level=quantize_8bit)


# Every op above, by name: the CUDA library registers a kernel for each name it implements, and
# falls back to REFERENCE (the plain functions, no dispatch) for inputs its kernels do not cover.
REFERENCE = {name: globals()[f"ref_{name}"] for name in ("quantize_4bit", "quantize_8bit", "dequantize_4bit", "matmul_4bit", "matmul_4bit_t")}
OPS = {
    "quantize_4bit": quantize_4bit,
    "quantize_8bit": quantize_8bit,
    "dequantize_4bit": dequantize_4bit,
    "matmul_4bit": matmul_4bit,
    "matmul_4bit_t": matmul_4bit_t,
}

