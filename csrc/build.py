"""Build libqlora_engine_cuda.so from the .cu files beside this script, with nvcc.

The one place that knows the nvcc command. setup.py loads it by path (it runs before the package is
installed); everything else through `qlora_engine.quant.cuda.builder()` (scripts/bench_kernels.py,
tests/quant/test_cuda.py). Standard library only.

    python csrc/build.py                      # all default archs -> qlora_engine/_lib/
    python csrc/build.py --arch 90 --out /tmp/lib.so

Environment: QLORA_ENGINE_NVCC (this nvcc and no other; a missing path means "no toolkit"),
CUDA_HOME / CUDA_PATH (where nvcc lives, else PATH), QLORA_ENGINE_CUDA_ARCHS
("80;86;89;90" by default: sm_80..sm_90 machine code plus PTX of the newest for later GPUs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent
LIB_NAME = "libqlora_engine_cuda.so"
DEFAULT_OUT = CSRC.parent / "qlora_engine" / "_lib" / LIB_NAME
DEFAULT_ARCHS = ("80", "86", "89", "90")
MIN_NVCC = (11, 8)  # bf16 mma, cp.async and sm_89/sm_90 targets


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def find_nvcc() -> str | None:
    """nvcc from QLORA_ENGINE_NVCC (exclusively, when set), else CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda."""
    pinned = os.environ.get("QLORA_ENGINE_NVCC")
    if pinned is not None:
        return pinned if Path(pinned).is_file() else None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def archs_from_env() -> tuple[str, ...]:
    raw = os.environ.get("QLORA_ENGINE_CUDA_ARCHS", "")
    archs = tuple(a for a in re.split(r"[;, ]+", raw.replace("sm_", "").replace(".", "")) if a)
    return archs or DEFAULT_ARCHS


def command(nvcc: str, out: Path, archs: tuple[str, ...], ptx: bool = True) -> list[str]:
    """The nvcc command line: one shared library, CUDA runtime linked statically, C symbols only.

    No --use_fast_math and no -ftz: the dequantization must round exactly like the PyTorch spec.
    """
    gencode = []
    for i, a in enumerate(archs):
        last = i == len(archs) - 1
        code = f"[sm_{a},compute_{a}]" if (last and ptx) else f"sm_{a}"
        gencode.append(f"-gencode=arch=compute_{a},code={code}")
    return [
        nvcc, "-O3", "-std=c++17", "-shared", "-cudart", "static", "-lineinfo", "--threads", "0",
        "-Xcompiler", "-fPIC,-fvisibility=hidden", *gencode, "-o", str(out), *map(str, sources()),
    ]  # fmt: skip


def build(out: Path | str = DEFAULT_OUT, archs: tuple[str, ...] | None = None, nvcc: str | None = None,
          ptx: bool = True, verbose: bool = False) -> tuple[bool, str]:  # fmt: skip
    """Compile the library to `out` (atomically replaced). Returns (ok, one-line message)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    ver = nvcc_version(nvcc)
    if ver is None:
        return False, f"{nvcc} --version did not run"
    if ver < MIN_NVCC:
        return False, f"nvcc {ver[0]}.{ver[1]} is older than {MIN_NVCC[0]}.{MIN_NVCC[1]}"
    if not sources():
        return False, f"no .cu sources in {CSRC}"
    archs = archs or archs_from_env()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: a process that has the old library open keeps a valid file.
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = command(nvcc, Path(tmp), archs, ptx)
    if verbose:
        print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=CSRC)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        return False, f"nvcc failed to start: {e}"
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
        if verbose:
            print(proc.stderr + proc.stdout, file=sys.stderr)
        return False, f"nvcc exited {proc.returncode}: {(errors or ['(no error line)'])[0].strip()}"
    os.chmod(tmp, 0o755)  # mkstemp made it private
    os.replace(tmp, out)
    ptx_arch = archs[-1] if ptx else ""
    _stamp(out).write_text(f"{source_hash()} {','.join(archs)} {ptx_arch}\n")
    return True, f"built {out} for sm_{',sm_'.join(archs)} with nvcc {ver[0]}.{ver[1]} in {dt:.0f} s"


def source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted([*sources(), *CSRC.glob("*.h")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _stamp(lib: Path) -> Path:
    return lib.with_name(lib.name + ".stamp")  # "<source hash> <archs> <ptx arch>", written by build()


def is_stale(lib: Path | str = DEFAULT_OUT, arch: str | None = None) -> bool:
    """True when the library is missing, was built from other sources, or (given `arch`, e.g. "90")
    carries neither machine code for it nor PTX old enough to be compiled for it."""
    lib = Path(lib)
    try:
        digest, archs, ptx_arch = (_stamp(lib).read_text().split() + ["", "", ""])[:3]
    except OSError:
        return True
    if not lib.is_file() or digest != source_hash():
        return True
    if arch is None:
        return False
    return arch not in archs.split(",") and not (ptx_arch and int(ptx_arch) <= int(arch))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="compute capability without the dot, e.g. 90 (repeatable)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--no-ptx", action="store_true", help="machine code only")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    ok, msg = build(args.out, tuple(args.arch) if args.arch else None, ptx=not args.no_ptx, verbose=args.verbose)
    print(msg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
