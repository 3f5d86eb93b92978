"""The machine a run is on: which device to use, byte sizes as people write them ("24GiB") and as
tables print them, memory (peak RSS, available RAM, the peak a device reached) and a one-line
description for benchmark tables. Touches /proc and torch only when asked.
"""

from __future__ import annotations

import os
import platform
import re

from .errors import InputError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """'24GiB' -> 25769803776; '5GB' -> 5000000000; a bare number is bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?[iI]?[bB]?)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise InputError(f"cannot read size {text!r}: write it like 24GiB, 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_bytes(n: float) -> str:
    """Binary units, three significant digits: 1.23 GiB."""
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM from /proc; 0 where there is no /proc)."""
    return _status("VmHWM:")


_REPORT_PEAK = "\nfrom qlora_engine.machine import peak_rss as _peak\nprint('PEAK_RSS', _peak())\n"


def child_peak_rss(code: str, args: list[str], env: dict | None = None) -> int:
    """Run `python -c code *args` in a fresh process and return its peak RSS in bytes.

    glibc gets a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), so freed tensor buffers go back to the
    OS and the peak measures live memory rather than allocator pools. A failing child raises
    RuntimeError with the last line of its stderr.
    """
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


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    """This process's resident set now, in bytes (0 where there is no /proc)."""
    return _status("VmRSS:")


def reset_peak_rss() -> None:
    """Start peak_rss() over from the current RSS (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def available_ram() -> int:
    """Host RAM available to a new allocation now (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_device(name: str = "auto"):
    """torch.device for `--device`: cuda, cpu, cuda:N, or auto (cuda when available); a one-line
    InputError when CUDA is asked for and missing."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but CUDA is not available here; use --device cpu (or auto)")
    return dev


def peak_memory(device) -> int:
    """The peak of the run so far: torch.cuda.max_memory_allocated on CUDA, peak RSS elsewhere."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def describe(device: str = "cpu") -> str:
    """'AMD EPYC 7B13, 2 cores, 24 GiB RAM' or the GPU's name: the machine line of a benchmark table."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    ram = ""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
        ram = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores{ram}"
