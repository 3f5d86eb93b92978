"""Byte sizes as people write them ("24GiB", "5GB", "500MB") and as tables print them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """'24GiB' -> 25769803776; '5GB' -> 5000000000; a bare number is bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?[iI]?[bB]?)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: write it like 24GiB, 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_bytes(n: float) -> str:
    """Binary units, three significant digits: 1.23 GiB."""
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM from /proc; 0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_REPORT_PEAK = "\nfrom qlora_engine.sizes import peak_rss as _peak\nprint('PEAK_RSS', _peak())\n"


def child_peak_rss(code: str, args: list[str], env: dict | None = None) -> int:
    """Run `python -c code *args` in a fresh process and return its peak RSS in bytes.

    glibc gets a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), so freed tensor buffers go back to the
    OS and the peak measures live memory rather than allocator pools. A failing child raises
    RuntimeError with the last line of its stderr.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", **(env or {})}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code + _REPORT_PEAK, *map(str, args)], capture_output=True, text=True,
                       env=env)  # fmt: skip
    line = [l for l in r.stdout.splitlines() if l.startswith("PEAK_RSS ")]
    if r.returncode or not line:
        raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1])
    return int(line[-1].split()[1])
