"""Finding and loading the compiled CUDA library (`csrc/`) and registering its kernels on the ops.

`load()` (run when `qlora_engine.quant` is imported) only dlopens files: it never initialises CUDA, so importing qlora_engine leaves
`torch.cuda` untouched. The library's own CUDA runtime starts on the first CUDA tensor that reaches
a kernel wrapper (`_probe`), i.e. once the process already uses CUDA.

Every registered wrapper first checks that its kernel covers the inputs (device, dtypes,
contiguity, blocksize, whether the extension is enabled) and otherwise calls the pure-PyTorch
reference, `ops.REFERENCE[name]`; so callers never ask whether the library is there.

Switches: `QLORA_ENGINE_NO_EXT=1` (never load), `set_enabled(False)` / `kernels(False)` (A/B at run
time), `QLORA_ENGINE_FUSED=1` or `set_fused(True)` (fused kernels for large M, for benchmarking),
`QLORA_ENGINE_LIB=/path/to.so` (another build). Thresholds: `GEMV_MAX_M`, `FUSED_MIN_M`, below.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from . import nf4, ops

LIB_NAME = "libqlora_engine_cuda.so"
ABI_VERSION = 1  # csrc/qlora_engine.h QE_ABI_VERSION
OPS_ACCELERATED = ("dequantize_4bit", "matmul_4bit", "matmul_4bit_t")

# The dispatch thresholds, in one place. M = rows of x (all leading dims flattened).
GEMV_MAX_M = 16  # M <= this: the small-M tensor-core GEMV kernels (the kernels' limit too)
FUSED_MIN_M: int | None = None  # M >= this: fused dequant-matmul; None: dequantize + cuBLAS (until measured faster)

_QE_UNSUPPORTED = 100001
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MM_DTYPES = (torch.float16, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_attempted = False
_state: dict = {"loaded": False, "reason": "load() not called yet", "path": None, "registered": []}
_enabled = True
_force_fused: bool | None = None
_probed: dict[int, bool] = {}


class _Quant(ctypes.Structure):
    """csrc/qlora_engine.h QeQuant."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("code", ctypes.c_void_p),
        ("nested_absmax", ctypes.c_void_p),
        ("nested_code", ctypes.c_void_p),
        ("offset", ctypes.c_float),
        ("blocksize", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


def library_path() -> Path:
    override = os.environ.get("QLORA_ENGINE_LIB")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "_lib" / LIB_NAME


def _build_note(path: Path) -> str:
    note = path.parent / "BUILD_STATUS.txt"
    try:
        return " (" + note.read_text().strip().splitlines()[-1] + ")" if note.is_file() else ""
    except (OSError, IndexError):
        return ""


def _declare(lib: ctypes.CDLL) -> None:
    q, p, i, i64 = ctypes.POINTER(_Quant), ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    sigs = {
        "qe_abi_version": ([], i),
        "qe_error_string": ([i], ctypes.c_char_p),
        "qe_probe": ([ctypes.POINTER(i)] * 3, i),
        "qe_dequantize_4bit": ([q, p, i, i64], i),
        "qe_gemv_4bit": ([q, p, i, i64, p, i64], i),
        "qe_gemv_4bit_t_workspace": ([q, i64], i64),
        "qe_gemv_4bit_t": ([q, p, i, i64, p, p, i64], i),
        "qe_gemm_4bit": ([q, p, i, i64, p, i64], i),
        "qe_gemm_4bit_t": ([q, p, i, i64, p, i64], i),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def load(retry: bool = False) -> bool:
    """dlopen the library and register its kernels on the ops, once. Returns whether it loaded.

    Idempotent; `retry=True` tries again after a failure (e.g. once a build has produced the file).
    """
    global _lib, _attempted, _force_fused
    with _lock:
        if _attempted and (_state["loaded"] or not retry):
            return _state["loaded"]
        _attempted = True
        fused = os.environ.get("QLORA_ENGINE_FUSED")
        if fused in ("0", "1"):
            _force_fused = fused == "1"
        path = library_path()
        _state["path"] = str(path)
        if os.environ.get("QLORA_ENGINE_NO_EXT", "") not in ("", "0"):
            _state["reason"] = "disabled by QLORA_ENGINE_NO_EXT"
            return False
        if not path.is_file():
            _state["reason"] = f"not built: no {path}{_build_note(path)}"
            return False
        try:  # the driver library; opening it does not initialise CUDA
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            _state["reason"] = "no CUDA driver: libcuda.so.1 cannot be loaded"
            return False
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            abi = lib.qe_abi_version()
        except (OSError, AttributeError) as e:
            _state["reason"] = f"load error: {e}"
            return False
        if abi != ABI_VERSION:
            _state["reason"] = f"stale build: ABI {abi}, expected {ABI_VERSION}; rebuild with python csrc/build.py"
            return False
        _lib = lib
        _register()
        _state.update(loaded=True, reason="loaded")
        return True


def _register() -> None:
    for name in OPS_ACCELERATED:
        ops.OPS[name].register_kernel("cuda")(_KERNELS[name])
        _state["registered"].append(name)


def status() -> dict:
    """What loaded and why, the switches and the thresholds (for `python -m qlora_engine.ext`)."""
    out = dict(_state, registered=list(_state["registered"]))
    out.update(enabled=_enabled, fused=_force_fused, gemv_max_m=GEMV_MAX_M, fused_min_m=FUSED_MIN_M)
    out["devices_probed"] = dict(_probed)
    return out


def available() -> bool:
    return _lib is not None and _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the CUDA kernels on or off at run time (off: the reference runs); returns the previous value."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


@contextmanager
def kernels(flag: bool):
    """`with cuda.kernels(False): ...` runs the block on the reference ops (end-to-end A/B)."""
    prev = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(prev)


def set_fused(flag: bool | None) -> bool | None:
    """Force (True) or forbid (False) the fused kernels above GEMV_MAX_M; None: FUSED_MIN_M decides."""
    global _force_fused
    prev, _force_fused = _force_fused, flag
    return prev


def choose_path(m: int) -> str:
    """'gemv' (M <= GEMV_MAX_M), 'fused', or 'dequant' (dequantize kernel + cuBLAS)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    fused = _force_fused if _force_fused is not None else (FUSED_MIN_M is not None and m >= FUSED_MIN_M)
    return "fused" if fused else "dequant"


# ---- checks and calls -------------------------------------------------------------------------


def _probe(device: torch.device) -> bool:
    """Start the library's CUDA runtime for this process (once); a failure disables the library."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _probed:
        n, rv, dv = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        err = _lib.qe_probe(ctypes.byref(n), ctypes.byref(rv), ctypes.byref(dv))
        _probed[idx] = err == 0 and idx < n.value
        if not _probed[idx]:
            _state["reason"] = (
                f"loaded, but its CUDA runtime {rv.value} failed on device {idx} (driver {dv.value}): "
                f"{_lib.qe_error_string(err).decode()}; using the reference"
            )
    return _probed[idx]


def _ready(t: Tensor) -> bool:
    return _enabled and _lib is not None and t.is_cuda and _probe(t.device)


def _weight_ok(device, packed, absmax, code, nested_absmax, nested_code, blocksize, n) -> bool:
    """The packed weight is one the kernels cover, and large enough for its n elements (never read past it)."""
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1) or ops.NESTED_BLOCKSIZE != 256:
        return False
    nblocks = -(-n // blocksize)
    tensors = [packed, absmax, code] + ([nested_absmax, nested_code] if nested_absmax is not None else [])
    if any(t.device != device or not t.is_contiguous() for t in tensors):
        return False
    if packed.dtype != torch.uint8 or packed.numel() < (n + 1) // 2:
        return False
    if code.dtype != torch.float32 or code.numel() < 16:
        return False
    if nested_absmax is None:
        return absmax.dtype == torch.float32 and absmax.numel() >= nblocks
    return (
        absmax.dtype == torch.uint8
        and absmax.numel() >= nblocks
        and nested_code is not None
        and nested_absmax.dtype == torch.float32
        and nested_absmax.numel() >= -(-nblocks // 256)
        and nested_code.dtype == torch.float32
        and nested_code.numel() >= 256
    )


def _quant(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, rows, cols) -> _Quant:
    ptr = lambda t: None if t is None else t.data_ptr()
    return _Quant(ptr(packed), ptr(absmax), ptr(code), ptr(nested_absmax), ptr(nested_code),
                  float(offset), int(blocksize), int(rows), int(cols))  # fmt: skip


def _call(fn_name: str, device: torch.device, *args) -> int:
    """Run one C entry point on `device`'s current stream; 0 or QE_ERR_UNSUPPORTED, else raise."""
    stream = torch.cuda.current_stream(device).cuda_stream
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            err = getattr(_lib, fn_name)(*args, stream)
    else:
        err = getattr(_lib, fn_name)(*args, stream)
    if err not in (0, _QE_UNSUPPORTED):
        raise RuntimeError(f"qlora_engine CUDA kernel {fn_name} failed: {_lib.qe_error_string(err).decode()} ({err})")
    return err


def _check_out(out: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    # The C side trusts the pointer: a wrong buffer would be written out of bounds.
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}")


# ---- the kernels, callable directly (bench, tests) or through the ops ---------------------------


def dequantize(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype,
               out: Tensor | None = None) -> Tensor:  # fmt: skip
    """ops.dequantize_4bit on the CUDA kernel when it covers the inputs, else the reference."""
    n = math.prod(shape)
    w = (packed, absmax, code, nested_absmax, nested_code, blocksize, n)
    if not (_ready(packed) and dtype in _DTYPE_CODES and _weight_ok(packed.device, *w)):
        return ops.REFERENCE["dequantize_4bit"](
            packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype
        )
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    _check_out(out, tuple(shape), dtype, packed.device)
    q = _quant(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, 1)
    _call("qe_dequantize_4bit", packed.device, ctypes.byref(q), out.data_ptr(), _DTYPE_CODES[dtype])
    return out


def _matmul(transpose: bool, a, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k,
            path: str | None, out: Tensor | None) -> Tensor:  # fmt: skip
    name = "matmul_4bit_t" if transpose else "matmul_4bit"
    args = (a, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k)
    inner, outer = (n, k) if transpose else (k, n)
    w = (packed, absmax, code, nested_absmax, nested_code, blocksize, n * k)
    if not (_ready(a) and a.dtype in _MM_DTYPES and a.dim() >= 1 and a.shape[-1] == inner
            and _weight_ok(a.device, *w)):  # fmt: skip
        return ops.REFERENCE[name](*args)
    a2 = a.reshape(-1, inner).contiguous()
    m = a2.shape[0]
    path = path or choose_path(m)
    if m == 0 or path == "dequant" or (path == "gemv" and m > GEMV_MAX_M):
        return ops.REFERENCE[name](*args)
    if out is None:
        out = a2.new_empty((m, outer))
    _check_out(out, (m, outer), a.dtype, a.device)
    q = _quant(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k)
    dt = _DTYPE_CODES[a.dtype]
    if path == "gemv" and transpose:
        ws_bytes = _lib.qe_gemv_4bit_t_workspace(ctypes.byref(q), m)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device)
        err = _call("qe_gemv_4bit_t", a.device, ctypes.byref(q), a2.data_ptr(), dt, m, out.data_ptr(), ws.data_ptr())
    else:
        fn = {("gemv", False): "qe_gemv_4bit", ("fused", False): "qe_gemm_4bit", ("fused", True): "qe_gemm_4bit_t"}[
            (path, transpose)
        ]
        err = _call(fn, a.device, ctypes.byref(q), a2.data_ptr(), dt, m, out.data_ptr())
    if err == _QE_UNSUPPORTED:
        return ops.REFERENCE[name](*args)
    return out.view(*a.shape[:-1], outer)


def matmul(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k,
           path: str | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """ops.matmul_4bit (Y = X . dequant(W)^T); `path` forces 'gemv', 'fused' or 'dequant'."""
    return _matmul(False, x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k, path, out)


def matmul_t(dy, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k,
             path: str | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """ops.matmul_4bit_t (dX = dY . dequant(W)); `path` as in `matmul`."""
    return _matmul(True, dy, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k, path, out)


# The functions registered for the CUDA dispatch key: exactly the op schemas' arguments.
def _k_dequantize(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    return dequantize(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype)


def _k_matmul(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
    return matmul(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k)


def _k_matmul_t(dy, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
    return matmul_t(dy, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k)


_KERNELS = {"dequantize_4bit": _k_dequantize, "matmul_4bit": _k_matmul, "matmul_4bit_t": _k_matmul_t}


# ---- building and checking ---------------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def builder():
    """`csrc/build.py` as a module (the one nvcc command line; standard library only), for tests and
    scripts that build the library. It is in a source checkout only, not in a wheel."""
    import importlib.util

    path = CSRC / "build.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: building the CUDA library needs a source checkout of qlora_engine")
    spec = importlib.util.spec_from_file_location("_qlora_engine_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def self_check() -> list[str]:
    """One small case per kernel against the reference on the current CUDA device: dequantize
    bit-exact, the matmuls at bf16 tolerance. One line per case; each ends in ok / bit-exact when it passed."""
    lines = []
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 96, 160
    w = torch.randn(n, k, generator=g)
    packed, st = nf4.quantize_4bit(w.to(dev), blocksize=64)
    wargs = (packed, st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset, st.blocksize)
    ref_w = ops.REFERENCE["dequantize_4bit"](*wargs, [n, k], torch.bfloat16)
    got_w = dequantize(*wargs, [n, k], torch.bfloat16)
    exact = torch.equal(ref_w.view(torch.int16), got_w.view(torch.int16))
    lines.append(f"dequantize bf16 {n}x{k}: {'bit-exact' if exact else 'MISMATCH'}")
    for m, path in ((4, "gemv"), (64, "fused")):
        x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
        dy = torch.randn(m, n, generator=g).to(dev, torch.bfloat16)
        for name, fn, a, ref in (
            ("matmul_4bit", matmul, x, x.float() @ ref_w.float().t()),
            ("matmul_4bit_t", matmul_t, dy, dy.float() @ ref_w.float()),
        ):
            got = fn(a, *wargs, n, k, path=path).float()
            err = ((got - ref).norm() / ref.norm()).item()
            lines.append(f"{name} M={m} ({path}): rel err {err:.2e} {'ok' if err < 1e-2 else 'TOO LARGE'}")
    return lines
