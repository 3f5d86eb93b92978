"""Resumable checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint (`output_dir/checkpoints/step-NNNNNNNN/`) holds the adapter in PEFT format, the
optimizer state, the schedule, every RNG state and the data position. It is written into a
temporary directory and renamed into place, so a crash leaves the previous checkpoint as it was.
On the CPU a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..lora import peft_format
from ..lora.inject import lora_layers
from ..models import tensorfiles

CHECKPOINTS = "checkpoints"


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch (epoch, index)."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens: int = 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / CHECKPOINTS
    return sorted(p for p in d.glob("step-*") if p.is_dir() and (p / "state.pt").exists()) if d.exists() else []


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, pos: Position, config: dict, keep: int, base: str) -> Path:
    """Write step-NNNNNNNN atomically and keep only the newest `keep` checkpoints."""
    final = Path(out_dir) / CHECKPOINTS / f"step-{pos.step:08d}"
    with tensorfiles.atomic_directory(final, force=True) as tmp:
        peft_format.save_adapter(model, tmp, base)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "position": pos.__dict__, "config": config},
                   tmp / "state.pt")  # fmt: skip
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_config(path: Path) -> dict:
    """The run config a checkpoint was made with."""
    return torch.load(Path(path) / "state.pt", weights_only=False)["config"]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Position:
    """Restore the adapter, optimizer, schedule and RNG states; returns where to continue."""
    _, weights = peft_format.read_adapter(path)
    layers = lora_layers(model)
    if set(weights) != set(layers):
        raise InputError(f"{path}: the checkpoint adapts other layers than this run; resume with the config it was made with")
    with torch.no_grad():
        for name, (A, B) in weights.items():
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    state = torch.load(path / "state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])
