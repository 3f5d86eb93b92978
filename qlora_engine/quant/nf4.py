"""The 4-bit format: NF4/FP4 code tables, blockwise quantize/dequantize (the reference), and the
quantization state with the exact state-dict keys bitsandbytes and transformers use.

This module is the spec. The custom ops (`ops.py`) call it as their default kernel and every CUDA
kernel in `csrc/` must reproduce it. It touches torch only.

Conventions (see the format notes in the README):
- Blocks cut the row-major flattened weight; the last block may be partial.
- Normalisation is a reciprocal multiply, `x * (1 / absmax)`, in float32, as bnb does, except in a
  partial last block, which bnb 0.50 normalises by division, `x / absmax` (the two differ only for a
  value within one ulp of a code midpoint).
- Code = nearest table value, exact ties to the lower code (`searchsorted(..., side="left")`).
- An all-zero block gets code 0 (bnb's CUDA convention, 0x00); bnb 0.50's CPU path writes 0x77.
  Both dequantize to zero.
- Double quantization: `offset = mean(absmax)` computed on the CPU (so the bytes do not depend on the
  device that quantized them), then 8-bit blockwise (256) with the signed dynamic map.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, before normalisation by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# Elements quantized per step: bounds the float32/int temporaries for very large weights.
_CHUNK = 1 << 20


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (index = code)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
        return raw / raw.abs().max()
    raise ValueError(f"unknown quant_type {quant_type!r}: use 'nf4' or 'fp4'")


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bnb's signed dynamic 8-bit map (256 sorted float32 values, -0.99296875 .. 1.0).

    Built the same way as `bitsandbytes.functional.create_dynamic_map(signed=True)`: for each
    exponent i in 0..6, the midpoints of `linspace(0.1, 1, 2**i + 1)` (float32) scaled by 10**(i-6),
    with both signs; then 0 and 1.0.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 midpoints of the sorted table and the sort order (identity for NF4 and the 8-bit map).

    The sort is stable, so for FP4 +0 (code 0) comes before -0 (code 8), as in bnb.
    """
    order = torch.argsort(code, stable=True)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported: use one of {BLOCKSIZES}")


def _quantize_chunk(x: torch.Tensor, blocksize: int, mids: torch.Tensor, order: torch.Tensor):
    """Codes (int32, in table order) and absmax (float32) of a flat float32 chunk, zero-padded."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    if nblocks * blocksize != n:
        x = torch.nn.functional.pad(x, (0, nblocks * blocksize - n))
    blocks = x.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    xn = blocks * (1.0 / absmax).unsqueeze(1)  # a zero block gives 0 * inf = NaN here
    if n % blocksize:
        xn[-1] = blocks[-1] / absmax[-1]
    idx = torch.searchsorted(mids, xn, side="left", out_int32=True)
    if order is not None:
        idx = order[idx.long()].int()
    idx.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return idx.view(-1), absmax


def quantize_codes_4bit(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: `a` (any shape, fp32/fp16/bf16) -> (packed uint8 [(n+1)//2], absmax float32 [nblocks]).

    Element 2j goes to the high nibble of byte j, element 2j+1 to the low nibble. An odd element
    count is padded with one 0.0 inside the last block.
    """
    check_blocksize(blocksize)
    flat = a.reshape(-1)
    n = flat.numel()
    mids, order = _midpoints(code.to(device=a.device, dtype=torch.float32))
    if torch.equal(order, torch.arange(16, device=order.device)):
        order = None
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=a.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=a.device)
    step = max(_CHUNK // blocksize, 1) * blocksize  # whole blocks, even
    for start in range(0, n, step):
        chunk = flat[start : start + step].float()
        idx, am = _quantize_chunk(chunk, blocksize, mids, order)
        pairs = idx[: 2 * ((chunk.numel() + 1) // 2)].view(-1, 2)
        packed[start // 2 : start // 2 + pairs.shape[0]] = ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
    return packed, absmax


def quantize_codes_8bit(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit with a sorted 256-value map: (uint8 codes [n], absmax float32 [nblocks]).

    An all-zero block is coded as the map's 0.0, so it dequantizes to 0 exactly.
    """
    flat = a.reshape(-1).float()
    mids, _ = _midpoints(code.to(device=a.device, dtype=torch.float32))
    idx, absmax = _quantize_chunk(flat, blocksize, mids, None)
    zero_code = int(torch.argmin(code.abs()))
    idx = idx.view(absmax.numel(), blocksize)
    idx.masked_fill_((absmax == 0).unsqueeze(1), zero_code)
    return idx.reshape(-1)[: flat.numel()].to(torch.uint8), absmax


def dequantize_codes_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`code[q] * absmax[i // blocksize]`, float32."""
    n = q.numel()
    vals = code.to(q.device)[q.reshape(-1).long()]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return vals * scale


def dequantize_absmax(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: float, nested_blocksize: int
) -> torch.Tensor:
    """Second level undone: `nested_code[q] * nested_absmax[i // 256] + offset`, float32, two roundings."""
    vals = dequantize_codes_8bit(qabsmax, nested_absmax, nested_code, nested_blocksize)
    return vals + torch.tensor(offset, dtype=torch.float32, device=vals.device)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] float32: byte b -> (code[b >> 4], code[b & 15])."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1)


def dequantize_codes_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape, dtype: torch.dtype
) -> torch.Tensor:
    """`dtype(code[c] * absmax[block])`: float32 product, one rounding to `dtype`."""
    n = math.prod(shape)
    table = _pair_table(code.to(device=packed.device, dtype=torch.float32))
    vals = table.index_select(0, packed.reshape(-1).view(torch.uint8).long()).view(-1)[:n]  # index_select: 3x faster than []
    nblocks = absmax.numel()
    if nblocks * blocksize == n:
        out = vals.view(nblocks, blocksize) * absmax.view(-1, 1)
    else:
        out = vals * absmax.repeat_interleave(blocksize)[:n]
    return out.to(dtype).view(shape)


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass
class QuantState:
    """Everything needed to dequantize one packed 4-bit weight, in bnb's layout.

    `absmax` is float32 [nblocks] without double quantization, uint8 [nblocks] with it (then
    `nested_absmax`, `nested_code` and `offset` hold the second level).
    """

    absmax: torch.Tensor
    shape: tuple[int, ...]
    code: torch.Tensor
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.bfloat16
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def absmax_float(self) -> torch.Tensor:
        """Per-block float32 scales, undoing double quantization when present."""
        if not self.nested:
            return self.absmax
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def packed_json(self) -> dict:
        """The non-tensor fields, in bnb's key order."""
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset)
        return d

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The quant-state entries of a bnb/transformers checkpoint (the packed weight itself excluded)."""
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.nested:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code
        blob = json.dumps(self.packed_json()).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "weight") -> "QuantState":
        """Inverse of `state_dict`; raises a one-line ValueError naming what is missing."""
        blob_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(blob_keys) != 1:
            raise ValueError(f"{prefix}: expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {blob_keys}")
        meta = json.loads(bytes(tensors[blob_keys[0]].cpu().numpy().tobytes()).decode("utf-8"))
        need = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if "nested_offset" in meta else [])
        missing = [f"{prefix}.{k}" for k in need if f"{prefix}.{k}" not in tensors]
        if missing:
            raise ValueError(f"{prefix}: the 4-bit checkpoint lacks {missing}; re-save it with transformers or qlora_engine.quantize")
        nested = "nested_offset" in meta
        return cls(
            absmax=tensors[f"{prefix}.absmax"],
            shape=tuple(meta["shape"]),
            code=tensors[f"{prefix}.quant_map"].float(),
            blocksize=int(meta["blocksize"]),
            quant_type=meta["quant_type"],
            dtype=_NAME_DTYPES[meta["dtype"]],
            nested_absmax=tensors[f"{prefix}.nested_absmax"].float() if nested else None,
            nested_code=tensors[f"{prefix}.nested_quant_map"].float() if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            offset=float(torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)) if nested else 0.0,
        )


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
    first_level=quantize_codes_4bit, second_level=quantize_codes_8bit,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a weight (any shape; fp32/fp16/bf16) to packed 4-bit and its state.

    Returns the packed codes as uint8 `[(n+1)//2, 1]`, bnb's `Params4bit` layout. `first_level` and
    `second_level` are the two blockwise quantizers; `ops.quantize_weight` passes the custom ops.
    """
    if w.dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot quantize a {w.dtype} tensor: give float32, float16 or bfloat16")
    check_blocksize(blocksize)
    code = code_table(quant_type, w.device)
    packed, absmax = first_level(w, code, blocksize)
    state = QuantState(absmax=absmax, shape=tuple(w.shape), code=code, blocksize=blocksize, quant_type=quant_type, dtype=w.dtype)
    if double_quant:
        offset = absmax.cpu().mean()  # CPU reduction: the same float32 on every device
        nested_code = dynamic_map(w.device)
        qabsmax, nested_absmax = second_level(absmax - offset.to(absmax.device), nested_code, NESTED_BLOCKSIZE)
        state = replace(state, absmax=qabsmax, nested_absmax=nested_absmax, nested_code=nested_code, offset=float(offset))
    return packed.view(-1, 1), state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back in `dtype` (default: the dtype it was quantized from), shape `state.shape`."""
    return dequantize_codes_4bit(packed, state.absmax_float(), state.code, state.blocksize, state.shape, dtype or state.dtype)


def packed_bytes(state: QuantState) -> int:
    """Bytes a quantized weight occupies: packed codes plus all quantization constants."""
    nblocks = -(-state.numel // state.blocksize)
    total = (state.numel + 1) // 2 + 16 * 4
    if state.nested:
        total += nblocks + 4 * -(-nblocks // state.nested_blocksize) + 256 * 4
    else:
        total += 4 * nblocks
    return total
