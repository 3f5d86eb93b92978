"""The GPU table the planner checks against, and forgiving lookup by name ("4090", "rtx4090",
"a100-80gb", "H100 SXM").

Only bf16-capable GPUs (sm80 and newer) are listed: the engine trains in bf16. Capacities are what
the driver reports as total memory (nvidia-smi's "MiB" column, i.e.
`torch.cuda.get_device_properties(i).total_memory`), not the marketing number: an "80 GB" A100 is
80 GiB, a "24 GB" L4 is 22.5 GiB. Touches nothing but this table.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    """One GPU model: its name, total memory in bytes, compute capability and the names people use."""

    name: str
    total_bytes: int
    sm: int  # compute capability x 10: 80 = A100, 86/89 = Ampere/Ada workstation and consumer, 90 = Hopper
    aliases: tuple[str, ...] = ()


GPUS: tuple[GPU, ...] = (
    GPU("L4", 23034 * MIB, 89, ("nvidia-l4",)),
    GPU("A10G", 23028 * MIB, 86, ("a10", "a10g")),
    GPU("RTX 4090", 24564 * MIB, 89, ("4090", "rtx4090", "geforce-rtx-4090")),
    GPU("RTX 3090", 24576 * MIB, 86, ("3090", "rtx3090", "geforce-rtx-3090", "3090ti", "rtx3090ti")),
    GPU("RTX 5090", 32607 * MIB, 120, ("5090", "rtx5090", "geforce-rtx-5090")),
    GPU("A100 40GB", 40960 * MIB, 80, ("a100-40gb", "a100-40g", "a100-40", "a100-sxm4-40gb", "a100-pcie-40gb")),
    GPU("L40S", 46068 * MIB, 89, ("l40s", "l40")),
    GPU("A40", 46068 * MIB, 86, ("a40",)),
    GPU("RTX A6000", 49140 * MIB, 86, ("a6000", "rtxa6000", "rtx-a6000")),
    GPU("RTX 6000 Ada", 49140 * MIB, 89, ("6000ada", "rtx6000ada", "rtx-6000-ada")),
    GPU("A100 80GB", 81920 * MIB, 80, ("a100", "a100-80gb", "a100-80g", "a100-80", "a100-sxm4-80gb", "a100-pcie-80gb")),
    GPU("H100 80GB", 81559 * MIB, 90, ("h100", "h100-80gb", "h100-sxm", "h100-pcie", "h100-sxm5-80gb")),
    GPU("H200", 143771 * MIB, 90, ("h200", "h200-141gb", "h200-sxm")),
)


def _key(text: str) -> str:
    """Lower case, no vendor words, no separators: 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    t = text.lower()
    for word in ("nvidia", "geforce", "tesla"):
        t = t.replace(word, "")
    t = re.sub(r"[\s_\-]+", "", t)
    return t.replace("gib", "gb")


def _keys(gpu: GPU) -> set[str]:
    return {_key(gpu.name)} | {_key(a) for a in gpu.aliases}


def find_gpu(name: str) -> GPU:
    """The GPU called `name`; a ValueError lists the known ones (nearest first) otherwise."""
    want = _key(name)
    exact = [g for g in GPUS if want in _keys(g)]
    if exact:
        return exact[0]
    # "rtx4090-24gb", "NVIDIA H100 80GB HBM3": the longest known name the text starts with
    prefixes = sorted(((k, g) for g in GPUS for k in _keys(g) if want.startswith(k)), key=lambda kg: -len(kg[0]))
    if prefixes and len(prefixes[0][0]) >= 3:
        return prefixes[0][1]
    all_keys = {k: g for g in GPUS for k in _keys(g)}
    near = [all_keys[k].name for k in difflib.get_close_matches(want, list(all_keys), n=3, cutoff=0.6)]
    near = list(dict.fromkeys(near))
    hint = f"did you mean {', '.join(near)}? " if near else ""
    known = ", ".join(g.name for g in GPUS)
    raise ValueError(f"unknown GPU {name!r}: {hint}known: {known}; or give --gpu-memory 24GiB")


def by_capacity() -> list[GPU]:
    """The table from the smallest to the largest memory (for 'the smallest GPU that fits')."""
    return sorted(GPUS, key=lambda g: (g.total_bytes, g.name))
