"""Resumable checkpoints you can trust: what a run needs to continue exactly where it stopped.

A checkpoint (`output_dir/checkpoints/step-NNNNNNNN/`) holds the adapter in PEFT format
(safetensors), the optimizer state (`optimizer.pt`), the schedule, every RNG state, the data
position and the run config (`state.pt`), and `manifest.json` with every file's size and sha256.
It is written into a temporary directory, every file and the directory fsynced, then renamed into
place: a crash or a full disk leaves the earlier checkpoints as they were.

Everything is read back with `torch.load(weights_only=True)`: the state holds only tensors and
plain types (the RNG states are stored as tensors), so a checkpoint from elsewhere cannot run code.
Resume verifies the newest checkpoint against its manifest and falls back to the newest intact one,
saying so in one line; with none intact it refuses. On the CPU a resumed run repeats the
uninterrupted one bit for bit.
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
from .sources import RESUME_FREE as DATA_RESUME_FREE

CHECKPOINTS = "checkpoints"
FILES = ("state.pt", peft_format.ADAPTER_WEIGHTS, peft_format.ADAPTER_CONFIG)  # + optimizer.pt, or dcp/ (FSDP)
# Keys that may differ between a checkpoint and the run that resumes it: none of them changes what
# the steps compute (the run may be extended, or its reporting changed).
RESUME_FREE = {"max_steps", "epochs", "save_every", "eval_every", "eval_batch_size", "log_every", "keep_checkpoints",
               "resume", "dry_run", "sample_prompt", "sample_max_new_tokens", "export", "output_dir", "device",
               "dist_timeout", "weight_pipeline", "offload_base"} | DATA_RESUME_FREE  # fmt: skip


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
    """Every RNG the run draws from, as tensors and plain numbers (loadable with weights_only)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "cpu": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: Path) -> list[Path]:
    """The step directories of a run, oldest first (intact or not)."""
    d = Path(out_dir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("step-*") if p.is_dir() and any((p / f).exists() for f in ("state.pt", tensorfiles.MANIFEST)))


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, pos: Position, config: dict, keep: int, base: str) -> Path:
    """Write step-NNNNNNNN atomically (fsynced, with its manifest); then keep only the newest `keep`."""
    final = Path(out_dir) / CHECKPOINTS / f"step-{pos.step:08d}"
    with tensorfiles.atomic_directory(final, force=True) as tmp:
        peft_format.save_adapter(model, tmp, base)
        tensorfiles.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "position": pos.__dict__, "config": config}
        tensorfiles.save_torch(state, tmp / "state.pt")
        tensorfiles.write_manifest(tmp)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path):
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises many types for a bad file
        raise InputError(f"{path} cannot be read as a weights-only torch file ({str(e).splitlines()[0][:160]})") from None


def damage(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (one line), or None when it is intact."""
    why = tensorfiles.verify_manifest(path)
    if why is None:
        missing = [f for f in FILES if not (path / f).is_file()]
        if not (path / "optimizer.pt").is_file() and not (path / "dcp" / ".metadata").is_file():
            missing.append("optimizer.pt")
        why = f"{missing[0]} is missing" if missing else None
    return why


def newest_intact(out_dir: Path, warn=print) -> Path:
    """The newest checkpoint whose files match their manifest; each newer damaged one is named in a
    one-line warning. InputError when there is none."""
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        raise InputError(f"resume asked for, but {Path(out_dir) / CHECKPOINTS} holds no checkpoint")
    skipped = []
    for path in reversed(ckpts):
        why = damage(path)
        if why is None:
            for bad, reason in skipped:
                warn(f"warning: checkpoint {bad.name} is damaged ({reason}); resuming from {path.name} instead")
            return path
        skipped.append((path, why))
    reasons = "; ".join(f"{p.name}: {w}" for p, w in skipped)
    raise InputError(f"no intact checkpoint in {Path(out_dir) / CHECKPOINTS} ({reasons}): start over in a new output_dir")


def saved_config(path: Path) -> dict:
    """The run config a checkpoint was made with."""
    return _load(Path(path) / "state.pt")["config"]


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: checkpoint -> now' for every setting that would change what the resumed steps compute."""
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RESUME_FREE and saved.get(k) != now.get(k)]  # fmt: skip


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Position:
    """Restore the adapter, optimizer, schedule and RNG states; returns where to continue."""
    _, weights = peft_format.read_adapter(path)
    layers = lora_layers(model)
    if set(weights) != set(layers):
        raise InputError(f"{path}: the checkpoint adapts other layers than this run; resume with the config it was made with")
    with torch.no_grad():
        for name, (A, B) in weights.items():
            if layers[name].lora_A.shape != A.shape or layers[name].lora_B.shape != B.shape:
                raise InputError(f"{path}: {name} has rank {A.shape[0]} in the checkpoint, {layers[name].r} in this run; "
                                 "resume with the config it was made with")  # fmt: skip
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
    optimizer.load_state_dict(_load(path / "optimizer.pt"))
    state = _load(path / "state.pt")
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])
