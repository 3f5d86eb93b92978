"""Check and time the CUDA 4-bit kernels against bitsandbytes and cuBLAS on the dequantized weight.

    python scripts/bench_kernels.py --check          # correctness only: every shape, odd ones too
    python scripts/bench_kernels.py                  # check a few, then time; table printed last
    python scripts/bench_kernels.py --quick --m 1,16,2048 --shapes llama2-7b

Builds the library for the local GPU first when it is missing or stale. Timing: each method runs
inside a CUDA graph (no Python or launch gaps), rotating among enough weight copies to overflow
the L2 cache, and the median over many replays is reported. Writes benchmarks/kernels-<gpu>.md
(only ever on a GPU). End-to-end A/B: `ab(step)` below times any step with the kernels on and
off, or `--e2e module:function` (a function returning a zero-argument step callable).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_engine.quant import cuda  # noqa: E402 - loads the library when it is built

SHAPES = {  # (N, K) = (out_features, in_features) of the linears
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "llama-65b": [(8192, 8192), (22016, 8192), (8192, 22016)],
}
M_VALUES = (1, 4, 16, 128, 512, 2048, 8192)
# Odd shapes for --check: odd N and K, K % 32 != 0, partial last blocks, tiny.
ODD_SHAPES = [(33, 96), (100, 160), (48, 37), (1000, 1001), (31, 33), (130, 4096), (4097, 1024)]


def ensure_library():
    """Build for this GPU when needed (before qlora_engine loads it), then load; exits on failure."""
    b = cuda.builder()
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    if b.is_stale(b.DEFAULT_OUT, arch):
        print(f"building the CUDA library for sm_{arch} ...", flush=True)
        ok, msg = b.build(b.DEFAULT_OUT, archs=(arch,))
        print(msg, flush=True)
        if not ok:
            sys.exit(1)
    if not cuda.load(retry=True):
        sys.exit(f"bench_kernels: the CUDA library did not load: {cuda.status()['reason']}")
    return cuda


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        return bnb, bnbF
    except Exception:  # noqa: BLE001 - not installed, or installed without its CUDA library
        return None, None


# ---- timing ------------------------------------------------------------------------------------


def time_ms(fns, reps: int = 30, graph: bool = True) -> float:
    """Median ms per call of `fns` (a list of zero-arg callables, run round-robin): CUDA graph replays."""
    for f in fns:  # warm up (allocator, cuBLAS handles, lazy loads) outside the capture
        f()
    torch.cuda.synchronize()
    calls = max(len(fns), 4)
    run = lambda: [fns[i % len(fns)]() for i in range(calls)]
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
        except Exception as e:  # noqa: BLE001 - a method that cannot be captured is timed eagerly
            print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", flush=True)
            g = None
    step = g.replay if g is not None else run
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return statistics.median(times)


def ab(step, iters: int = 10, warmup: int = 3) -> dict:
    """End-to-end A/B: median ms of `step()` with the CUDA kernels on and off (the reference ops)."""

    out = {}
    for flag in (True, False):
        with cuda.kernels(flag):
            for _ in range(warmup):
                step()
            torch.cuda.synchronize()
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
        out["on" if flag else "off"] = statistics.median(ts)
    return out


# ---- problems ----------------------------------------------------------------------------------


def make_weight(n, k, blocksize=64, seed=0, device="cuda"):
    from qlora_engine.quant import nf4

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    packed, st = nf4.quantize_4bit(w, blocksize=blocksize)
    return (packed, st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset, st.blocksize)


def _rel(got, ref):
    return ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_shape(n, k, ms, dtype=torch.bfloat16, blocksize=64) -> list[tuple[str, bool, str]]:
    """Every path against an fp32 reference, outputs poisoned with NaN first; dequantize bit-exact."""
    from qlora_engine.quant import ops

    res = []
    w = make_weight(n, k, blocksize, seed=n * 31 + k)
    w32 = ops.REFERENCE["dequantize_4bit"](*w, [n, k], torch.float32)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        ref = ops.REFERENCE["dequantize_4bit"](*w, [n, k], dt)
        out = torch.full((n, k), float("nan"), dtype=dt, device="cuda")
        got = cuda.dequantize(*w, [n, k], dt, out=out)
        ran = got.data_ptr() == out.data_ptr()
        same = torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
        detail = ("bit-exact" if same else "MISMATCH") + ("" if ran else " (the kernel did not run)")
        res.append((f"dequantize {n}x{k} {str(dt)[6:]}", ran and same, detail))
    wd = w32.to(dtype).float()
    del w32
    for m in ms:
        x = torch.randn(m, k, device="cuda").to(dtype)
        dy = torch.randn(m, n, device="cuda").to(dtype)
        ref_y, ref_dx = x.float() @ wd.t(), dy.float() @ wd
        for path in (["gemv"] if m <= cuda.GEMV_MAX_M else []) + ["fused", None]:
            for name, fn, a, ref, shape in (
                ("fwd", cuda.matmul, x, ref_y, (m, n)),
                ("bwd", cuda.matmul_t, dy, ref_dx, (m, k)),
            ):
                out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
                got = fn(a, *w, n, k, path=path, out=out if path else None)
                ran = "kernel" if got.data_ptr() == out.data_ptr() else "reference"
                err = _rel(got, ref)
                ok = err < 1e-2 and not torch.isnan(got).any().item()
                res.append((f"{name} {n}x{k} M={m} {path or 'auto'} ({ran})", ok, f"rel err {err:.1e}"))
        del x, dy, ref_y, ref_dx
    torch.cuda.empty_cache()
    return res


def run_check(shapes, ms, verbose=False) -> bool:
    rows = []
    for n, k in shapes:
        rows += check_shape(n, k, ms)
        rows += check_shape(n, k, [3], dtype=torch.float16) if (n, k) == shapes[0] else []
    for n, k in ODD_SHAPES:
        rows += check_shape(n, k, [1, 9, 100])
    rows += check_shape(96, 256, [5, 40], blocksize=32) + check_shape(96, 4096, [5, 40], blocksize=4096)
    bad = [r for r in rows if not r[1]]
    for label, ok, detail in rows if verbose else bad:
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}")
    worst = max((float(d.split()[-1]) for _, _, d in rows if d.startswith("rel err")), default=0.0)
    print(f"check: {len(rows) - len(bad)}/{len(rows)} passed (largest matmul relative error {worst:.1e})")
    return not bad


# ---- timing table ------------------------------------------------------------------------------


def prepare(n, k, l2_bytes, bnbF) -> dict:
    """Weight copies for one shape, enough of each kind to overflow the L2 when rotated through."""
    from qlora_engine.quant import ops

    copies = max(1, min(128, math.ceil(3 * l2_bytes / (n * k // 2))))
    ws = [make_weight(n, k, seed=i) for i in range(copies)]
    wb_copies = max(1, min(64, math.ceil(3 * l2_bytes / (2 * n * k))))
    wbs = [ops.dequantize_4bit(*ws[i % copies], [n, k], torch.bfloat16) for i in range(wb_copies)]
    qs = []
    if bnbF is not None:
        qs = [bnbF.quantize_4bit(wbs[i % wb_copies], blocksize=64, compress_statistics=True, quant_type="nf4")
              for i in range(copies)]  # fmt: skip
    return {"ws": ws, "wbs": wbs, "qs": qs}


def bench_config(bnb, bnbF, prep, n, k, m, direction, reps) -> dict:
    from qlora_engine.quant import ops

    dtype = torch.bfloat16
    ws, wbs, qs = prep["ws"], prep["wbs"], prep["qs"]
    fwd = direction == "fwd"
    a = torch.randn(m, k if fwd else n, device="cuda").to(dtype)
    op = ops.matmul_4bit if fwd else ops.matmul_4bit_t
    row = {"ours": time_ms([lambda w=w: op(a, *w, n, k) for w in ws], reps), "path": cuda.choose_path(m)}
    if m > cuda.GEMV_MAX_M:
        f = cuda.matmul if fwd else cuda.matmul_t
        row["fused"] = time_ms([lambda w=w: f(a, *w, n, k, path="fused") for w in ws], reps)
    row["cublas"] = time_ms([(lambda w=w: a @ w.t()) if fwd else (lambda w=w: a @ w) for w in wbs], reps)
    if qs:
        if fwd:
            row["bnb"] = time_ms([lambda p=p, s=s: bnb.matmul_4bit(a, p.t(), quant_state=s) for p, s in qs], reps)
        else:  # bnb's MatMul4Bit.backward: dequantize, then one matmul
            row["bnb"] = time_ms([lambda p=p, s=s: a @ bnbF.dequantize_4bit(p, s).to(dtype) for p, s in qs], reps)
    return row


def bench_dequant(ws, n, k, reps):
    from qlora_engine.quant import ops

    ms = time_ms([lambda w=w: ops.dequantize_4bit(*w, [n, k], torch.bfloat16) for w in ws], reps)
    gbs = (n * k * 2.5 + n * k / 64) / ms / 1e6  # packed read + bf16 write (+ absmax)
    return ms, gbs


def fmt_ms(v):
    return "n/a" if v is None else (f"{v * 1e3:.1f} us" if v < 1 else f"{v:.3f} ms")


def table(rows, has_bnb) -> list[str]:
    head = "| model | N x K | M | dir | ours | path | fused | bnb | cuBLAS bf16 | cuBLAS/ours | bnb/ours | ours rate |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bnb = r.get("bnb")
        bnb_ratio = f"{bnb / r['ours']:.2f}x" if bnb else "n/a"
        if r["m"] <= 16:
            rate = f"{(r['n'] * r['k'] / 2 * 1.03) / r['ours'] / 1e6:.0f} GB/s"
        else:
            rate = f"{2 * r['m'] * r['n'] * r['k'] / r['ours'] / 1e9:.0f} TFLOP/s"
        lines.append(
            f"| {r['model']} | {r['n']}x{r['k']} | {r['m']} | {r['dir']} | {fmt_ms(r['ours'])} | {r['path']} | "
            f"{fmt_ms(r.get('fused'))} | {fmt_ms(bnb) if has_bnb else 'n/a'} | {fmt_ms(r['cublas'])} | "
            f"{r['cublas'] / r['ours']:.2f}x | {bnb_ratio} | {rate} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check and time the qlora_engine CUDA kernels.")
    ap.add_argument("--check", action="store_true", help="correctness only")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of M (rows of x)")
    ap.add_argument("--dir", default="fwd,bwd")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer reps; skip the pre-timing check")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/kernels-<gpu>.md")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every check, not only failures")
    ap.add_argument("--e2e", metavar="MODULE:FUNC", help="A/B a step from FUNC() with the kernels on vs off")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here (torch.cuda.is_available() is False); nothing to check or time.")
        return 0
    ensure_library()
    models = [s for s in args.shapes.split(",") if s]
    shapes = list(dict.fromkeys(nk for s in models for nk in SHAPES[s]))
    ms = [int(v) for v in args.m.split(",") if v]
    dirs = [d for d in args.dir.split(",") if d]
    gpu = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(
        f"{gpu}: {props.multi_processor_count} SMs, L2 {l2 >> 20} MB; torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    print(f"library: {cuda.status()['path']}")

    if args.e2e:
        mod, fn = args.e2e.split(":")
        res = ab(getattr(importlib.import_module(mod), fn)())
        print(f"e2e {args.e2e}: kernels on {res['on']:.2f} ms, off {res['off']:.2f} ms ({res['off'] / res['on']:.2f}x)")
        return 0
    if args.check:
        return 0 if run_check(shapes, [1, 5, 16, 100, 512], args.verbose) else 1
    checked = "skipped (--quick)"
    if not args.quick:
        ok = run_check(shapes[:2], [1, 16, 300], args.verbose)
        checked = "passed" if ok else "FAILED"
        if not ok:
            print("correctness check failed: not timing")
            return 1

    bnb, bnbF = _bnb()
    reps = 10 if args.quick else args.reps
    rows, deq = [], []
    for n, k in shapes:
        prep = prepare(n, k, l2, bnbF)
        d_ms, d_gbs = bench_dequant(prep["ws"], n, k, reps)
        deq.append(f"| {n}x{k} | {fmt_ms(d_ms)} | {d_gbs:.0f} GB/s |")
        for m in ms:
            for d in dirs:
                model = next(s for s in models if (n, k) in SHAPES[s])
                r = bench_config(bnb, bnbF, prep, n, k, m, d, reps)
                r.update(model=model, n=n, k=k, m=m, dir=d)
                rows.append(r)
                print(f"{model} {n}x{k} M={m} {d}: ours {fmt_ms(r['ours'])} ({r['path']}), cuBLAS {fmt_ms(r['cublas'])}, "
                      f"bnb {fmt_ms(r.get('bnb'))}, fused {fmt_ms(r.get('fused'))}", flush=True)  # fmt: skip
        del prep
        torch.cuda.empty_cache()

    lines = table(rows, bnb is not None)
    dq = ["| N x K | dequantize to bf16 | effective bandwidth |", "|---|---|---|", *deq]
    print("\n" + "\n".join(dq) + "\n\n" + "\n".join(lines))
    if not args.no_write:
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        out = ROOT / "benchmarks" / f"kernels-{slug}.md"
        out.parent.mkdir(exist_ok=True)
        bnb_ver = getattr(bnb, "__version__", "not installed")
        out.write_text(
            f"# qlora_engine CUDA kernels on {gpu}\n\n"
            f"{datetime.date.today()}; torch {torch.__version__} (CUDA {torch.version.cuda}); bitsandbytes {bnb_ver}; "
            f"{props.multi_processor_count} SMs, L2 {l2 >> 20} MB.\n"
            f"Command: `python scripts/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
            f"Correctness check before timing: {checked}.\n\n"
            "Median of CUDA-graph replays, weights rotated through more than 3x the L2; bf16 activations; "
            "blocksize 64 with double quantization. 'ours' is the dispatcher's choice (`path`); 'fused' forces the "
            "fused kernel; bnb is `bnb.matmul_4bit` forward and dequantize + matmul backward (what PEFT runs); "
            "cuBLAS multiplies the already-dequantized bf16 weight. Ratios > 1: ours faster. Rate: packed-weight GB/s "
            "for M <= 16, TFLOP/s above.\n\n" + "\n".join(dq) + "\n\n" + "\n".join(lines) + "\n"
        )
        print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
