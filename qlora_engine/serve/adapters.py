"""The adapters a server holds, by name: read and checked off the engine thread (`prepare`), put
into the model's `MultiLoraLinear` layers between two forwards (`install`, on the engine thread),
and taken out again (`remove`) once no running request uses them.

The base is never touched: an adapted layer is wrapped in a `MultiLoraLinear` the first time an
adapter names it, and the wrapper's base layer is the same module. Checks reuse
`lora.peft_format` (`read_adapter`, `check_adapter_fits`, `provenance`), so a refused adapter gets
the same one-line message `qlora generate` would give.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..lora.layers import layer_kind, lora_scaling
from ..lora.peft_format import adapter_alpha, check_adapter_fits, provenance, read_adapter
from ..models.loader import QuantSpec
from ..models.structure import replace_module
from .multi_lora import MultiLoraLinear
from .rows import Rows

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")


class UnknownModel(InputError):
    """A request named a model that is neither the base nor a loaded adapter (HTTP 404)."""


class NameTaken(InputError):
    """An adapter was loaded under a name already in use (HTTP 409)."""


@dataclass
class Prepared:
    """An adapter read from disk and checked against the base, not installed yet."""

    name: str
    path: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # layer -> (A, B, scaling)

    @property
    def ranks(self) -> list[int]:
        return sorted({A.shape[0] for A, _, _ in self.layers.values()})


def _describe(kind: str, spec) -> str:
    """A base as an error message names it: bf16, or nf4 with its quantization settings."""
    return "bf16" if kind == "bf16" else f"nf4 (blocksize {spec.blocksize}, double quant {spec.double_quant})"


@dataclass
class Adapter:
    """A loaded adapter: its slot in every `MultiLoraLinear`, and how many requests use it."""

    name: str
    path: Path
    slot: int
    layer_names: list[str]
    ranks: list[int]
    nbytes: int  # its A and B in the compute dtype
    created: int
    users: int = 0
    removed: bool = False

    def describe(self) -> dict:
        return {"id": self.name, "object": "adapter", "path": str(self.path), "ranks": self.ranks,
                "layers": len(self.layer_names), "bytes": self.nbytes, "created": self.created}  # fmt: skip


class _BaseView:
    """The model as `check_adapter_fits` should see it: wrapped layers show their base layer."""

    def __init__(self, model: nn.Module):
        self.model = model

    def get_submodule(self, name: str) -> nn.Module:
        m = self.model.get_submodule(name)
        return m.base_layer if isinstance(m, MultiLoraLinear) else m


class AdapterRegistry:
    """Name -> `Adapter`. `prepare` may run on any thread; `install`, `remove` and `release`
    change the model's layers and run on the engine thread, between two forwards."""

    def __init__(self, model: nn.Module, base_name: str, base_kind: str, quant: QuantSpec, dtype: torch.dtype):
        self.model, self.base_name, self.base_kind, self.quant, self.dtype = model, base_name, base_kind, quant, dtype
        self.rows = Rows()
        self._by_name: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self._next_slot = 1
        self._free_slots: list[int] = []
        self.bank_bytes = 0  # bytes the stacked A/B of every adapted layer hold (capacity included)

    # --- any thread -------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return [self._by_name[n] for n in sorted(self._by_name)]

    def acquire(self, name: str) -> Adapter | None:
        """The adapter a request's `model` names (None for the base), counted as in use until `release`."""
        if name == self.base_name:
            return None
        with self._lock:
            a = self._by_name.get(name)
            if a is None:
                known = ", ".join([self.base_name, *sorted(self._by_name)])
                raise UnknownModel(f"The model `{name}` does not exist: this server has {known} (GET /v1/models lists them)")
            a.users += 1
            return a

    def prepare(self, name: str, path: str | Path) -> Prepared:
        """Read a PEFT adapter directory and check it against the base; a one-line InputError when
        it cannot be served. Touches nothing."""
        self.check_name(name)
        path = Path(path).expanduser()
        if not path.is_dir():
            raise InputError(f"{path}: no such adapter directory (it needs adapter_config.json and adapter_model.safetensors)")
        cfg, weights = read_adapter(path)
        kind, spec, recorded = provenance(path)
        if not weights:
            raise InputError(f"{path}: the adapter holds no LoRA tensors")
        if recorded and (kind != self.base_kind or (kind == "nf4" and spec != self.quant)):
            raise InputError(f"{path}: the adapter was trained on a {_describe(kind, spec)} base but this server holds a "
                             f"{_describe(self.base_kind, self.quant)} "
                             f"base, so its answers would differ from training's; serve it from a server started with "
                             f"--base {kind}")  # fmt: skip
        view = _BaseView(self.model)
        check_adapter_fits(view, weights, path)
        layers = {}
        for lname, (A, B) in sorted(weights.items()):
            base = view.get_submodule(lname)
            if layer_kind(base) != "linear":
                raise InputError(f"{path}: adapter layer {lname} adapts a {type(base).__name__}; the server applies "
                                 "adapters to linear layers only")  # fmt: skip
            for t, ab in ((A, "A"), (B, "B")):
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise InputError(f"{path}: lora_{ab} of layer {lname} holds NaN/Inf or is not floating point; the "
                                     "adapter is damaged")  # fmt: skip
            try:
                alpha = float(adapter_alpha(cfg, lname))
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{path}/adapter_config.json has no valid lora_alpha") from None
            layers[lname] = (A, B, lora_scaling(alpha, A.shape[0], bool(cfg.get("use_rslora", False))))
        return Prepared(name, path, layers)

    def check_name(self, name: str) -> None:
        """An InputError when `name` cannot name a new adapter (NameTaken when it is in use)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"adapter name {name!r} is not allowed: use 1-128 letters, digits and ._:/@- , starting with "
                             "a letter or digit")  # fmt: skip
        self._check_free(name)

    def _check_free(self, name: str) -> None:
        with self._lock:
            if name == self.base_name or name in self._by_name:
                raise NameTaken(f"the name {name!r} is already in use on this server (DELETE /v1/adapters/{name} first, "
                                "or choose another name)")  # fmt: skip

    # --- the engine thread ------------------------------------------------------------------
    def install(self, p: Prepared, created: int = 0) -> Adapter:
        """Put a prepared adapter into the model under a new slot; returns it, ready for requests."""
        self._check_free(p.name)
        slot = self._free_slots.pop() if self._free_slots else self._next_slot
        if slot == self._next_slot:
            self._next_slot += 1
        nbytes, itemsize = 0, self.dtype.itemsize
        for lname, (A, B, scaling) in p.layers.items():
            layer = self.model.get_submodule(lname)
            if not isinstance(layer, MultiLoraLinear):
                layer = replace_module(self.model, lname, MultiLoraLinear(layer, self.rows, self.dtype))
            layer.add(slot, A, B, scaling)
            nbytes += (A.numel() + B.numel()) * itemsize
        a = Adapter(p.name, p.path, slot, sorted(p.layers), p.ranks, nbytes, created)
        with self._lock:
            self._by_name[p.name] = a
        self._count_bytes()
        return a

    def remove(self, name: str) -> Adapter:
        """Take an adapter's name away now; its slot is freed when its last running request ends."""
        with self._lock:
            a = self._by_name.pop(name, None)
            if a is None:
                raise UnknownModel(f"no adapter named {name!r} is loaded (loaded: {', '.join(sorted(self._by_name)) or 'none'})")
            a.removed = True
            idle = a.users == 0
        if idle:
            self._free(a)
        return a

    def release(self, a: Adapter | None) -> None:
        """A request that used `a` ended."""
        if a is None:
            return
        with self._lock:
            a.users -= 1
            idle = a.removed and a.users == 0
        if idle:
            self._free(a)

    def _free(self, a: Adapter) -> None:
        for lname in a.layer_names:
            self.model.get_submodule(lname).remove(a.slot)
        self._free_slots.append(a.slot)
        self._count_bytes()

    def _count_bytes(self) -> None:
        self.bank_bytes = sum(b.nbytes() for m in self.model.modules() if isinstance(m, MultiLoraLinear)
                              for b in m.banks.values())  # fmt: skip
