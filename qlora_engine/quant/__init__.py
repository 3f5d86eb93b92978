"""The 4-bit format and everything that computes with it.

- `nf4`: the format itself (code tables, blockwise quantize/dequantize, `QuantState` with
  bitsandbytes' keys). The spec: every kernel must reproduce it.
- `ops`: the custom ops (schemas, fake kernels, the pure-PyTorch default kernels from `nf4`).
- `cuda`: the compiled library in `csrc/`, loaded with ctypes, registering faster kernels on the
  same ops. It imports `ops`; `ops` never imports it. Importing this package loads it when it is
  built (a dlopen; CUDA itself is not initialised).
- `linear`: `NF4Linear`, the frozen 4-bit linear layer, and the frozen-base forward/backward that
  LoRA layers call.
May import: torch only.
"""

from . import ops
from . import cuda as _cuda

_cuda.load()

from .linear import NF4Linear  # noqa: E402
from .nf4 import QuantState, dequantize_4bit, quantize_4bit  # noqa: E402

__all__ = ["NF4Linear", "QuantState", "dequantize_4bit", "ops", "quantize_4bit"]
