"""Packaging; the CUDA library in csrc/ is built here when a CUDA toolkit is present.

Metadata lives in pyproject.toml. This file only adds one step to `build_py`, which runs for a
normal `pip install .` and, in editable mode, for `pip install -e .` (PEP 660): compile
csrc/*.cu with nvcc (csrc/build.py) into qlora_engine/_lib/libqlora_engine_cuda.so: the source
tree when editable, the wheel otherwise. It never fails the install: without nvcc, with
QLORA_ENGINE_BUILD_CUDA=0, or when nvcc fails, it prints one line saying why and goes on (the
package then runs on its PyTorch reference ops). A library built from the same csrc/ sources (by
source hash) is kept, not rebuilt. A machine with nvcc but no GPU builds it too: that is how a
build is carried to a GPU machine. The same line is kept in
qlora_engine/_lib/BUILD_STATUS.txt, which `qlora ext` reports.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
BUILDER = ROOT / "csrc" / "build.py"
WANT_CUDA = os.environ.get("QLORA_ENGINE_BUILD_CUDA", "1") != "0"


def _builder():
    spec = importlib.util.spec_from_file_location("_qlora_engine_csrc_build", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_cuda_library(lib_dir: Path) -> str:
    """Build the library into lib_dir if possible; returns the one-line outcome."""
    if not WANT_CUDA:
        return "CUDA library skipped: QLORA_ENGINE_BUILD_CUDA=0"
    if not BUILDER.is_file():
        return f"CUDA library skipped: {BUILDER} not found (not part of this source tree)"
    try:
        b = _builder()
        if b.find_nvcc() is None:
            return "CUDA library skipped: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        if not b.is_stale(lib_dir / b.LIB_NAME):
            return f"CUDA library up to date: csrc/ unchanged since it was built (source hash {b.source_hash()}); not rebuilt"
        ok, msg = b.build(lib_dir / b.LIB_NAME)
    except Exception as e:  # noqa: BLE001 - never fail the install over the optional library
        ok, msg = False, f"{type(e).__name__}: {e}"
    return f"CUDA library {msg}" if ok else f"CUDA library NOT built ({msg}); using the PyTorch reference ops"


class BuildPyWithCuda(build_py):
    def run(self):
        super().run()
        lib_dir = (ROOT if self.editable_mode else Path(self.build_lib)) / "qlora_engine" / "_lib"
        line = build_cuda_library(lib_dir)
        if not self.editable_mode and not line.startswith(("CUDA library built", "CUDA library up to date")):
            # package-data may have copied a library left in the source tree by an earlier editable
            # build; a wheel carries only what this build compiled.
            for stale in lib_dir.glob("*.so"):
                stale.unlink()
        print(f"qlora_engine: {line}", flush=True)
        try:
            lib_dir.mkdir(parents=True, exist_ok=True)
            (lib_dir / "BUILD_STATUS.txt").write_text(line + "\n")
        except OSError:
            pass


class MaybeBinaryDistribution(Distribution):
    """A wheel that may carry the .so must be tagged for this platform, not py3-none-any."""

    def has_ext_modules(self):
        try:
            return WANT_CUDA and BUILDER.is_file() and _builder().find_nvcc() is not None
        except Exception:  # noqa: BLE001 (a broken toolkit means: no binary wheel)
            return False


setup(cmdclass={"build_py": BuildPyWithCuda}, distclass=MaybeBinaryDistribution)
