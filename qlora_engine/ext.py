"""`python -m qlora_engine.ext`: whether the CUDA kernel library loaded, and why (not).

python -m qlora_engine.ext            # status only; touches CUDA only to report the device
python -m qlora_engine.ext --check    # also run each kernel once against the reference (needs a GPU)
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import _ext, ops


def _self_check() -> list[str]:
    """One small case per kernel vs the reference: dequantize bit-exact, matmuls at bf16 tolerance."""
    from . import nf4

    lines = []
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 96, 160
    w = torch.randn(n, k, generator=g)
    packed, st = nf4.quantize_4bit(w.to(dev), blocksize=64)
    wargs = (packed, st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset, st.blocksize)
    ref_w = ops.REFERENCE["dequantize_4bit"](*wargs, [n, k], torch.bfloat16)
    got_w = _ext.dequantize(*wargs, [n, k], torch.bfloat16)
    lines.append(
        f"dequantize bf16 {n}x{k}: {'bit-exact' if torch.equal(ref_w.view(torch.int16), got_w.view(torch.int16)) else 'MISMATCH'}"
    )
    for m, path in ((4, "gemv"), (64, "fused")):
        x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
        dy = torch.randn(m, n, generator=g).to(dev, torch.bfloat16)
        for name, fn, a, ref in (
            ("matmul_4bit", _ext.matmul, x, x.float() @ ref_w.float().t()),
            ("matmul_4bit_t", _ext.matmul_t, dy, dy.float() @ ref_w.float()),
        ):
            got = fn(a, *wargs, n, k, path=path).float()
            err = ((got - ref).norm() / ref.norm()).item()
            lines.append(f"{name} M={m} ({path}): rel err {err:.2e} {'ok' if err < 1e-2 else 'TOO LARGE'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Report the qlora_engine CUDA kernel library's status.")
    ap.add_argument("--check", action="store_true", help="run each kernel once against the reference (GPU only)")
    args = ap.parse_args(argv)
    st = _ext.status()
    print(f"library:   {st['path']}")
    print(f"loaded:    {st['loaded']} ({st['reason']})")
    print(f"kernels:   {', '.join(st['registered']) or 'none'} (enabled={st['enabled']})")
    fused = {True: "forced on", False: "forced off"}.get(st["fused"]) or (
        f"M >= {st['fused_min_m']}" if st["fused_min_m"] is not None else "never unless forced"
    )
    print(f"dispatch:  gemv for M <= {st['gemv_max_m']}; fused kernel: {fused}; else dequantize + cuBLAS")
    print(f"torch:     {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device:    {torch.cuda.get_device_name()}")
    if args.check:
        if not (st["loaded"] and torch.cuda.is_available()):
            print("check:     skipped (needs the loaded library and a CUDA device)")
            return 1
        lines = _self_check()
        for line in lines:
            print(f"check:     {line}")
        st = _ext.status()
        if st["devices_probed"] and not all(st["devices_probed"].values()):
            print(f"check:     {st['reason']}")
            return 1
        return 0 if all(("ok" in ln or "bit-exact" in ln) for ln in lines) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
