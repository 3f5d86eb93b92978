"""`qlora ext` (= `python -m qlora_engine.ext`): whether the CUDA kernel library loaded, and why (not).

    qlora ext            # status only; touches CUDA only to report the device
    qlora ext --check    # also run each kernel once against the reference; on a machine without a
                         # GPU or library it says it skipped and exits 0 (a skip is not a failure)
"""

from __future__ import annotations

from . import args


def build_parser(prog: str = "qlora ext"):
    p = args.parser(prog, "Report the qlora_engine CUDA kernel library's status.")
    p.add_argument("--check", action="store_true", help="run each kernel once against the reference (GPU only)")
    return p


def run(argv: list[str]) -> int:
    import torch

    from ..quant import cuda

    a = build_parser().parse_args(argv)
    st = cuda.status()
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
    if a.check:
        if not (st["loaded"] and torch.cuda.is_available()):
            print("check:     skipped (needs the loaded library and a CUDA device)")
            return 0
        lines = cuda.self_check()
        for line in lines:
            print(f"check:     {line}")
        st = cuda.status()
        if st["devices_probed"] and not all(st["devices_probed"].values()):
            print(f"check:     {st['reason']}")
            return 1
        return 0 if all(("ok" in ln or "bit-exact" in ln) for ln in lines) else 1
    return 0

