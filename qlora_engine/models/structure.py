"""How a model is put together, read off the module tree: its decoder blocks, the linear layers
inside them, which module owns a checkpoint tensor, and swapping one module for another.

The loader (which layers to quantize), LoRA (which layers "all-linear" means), recompute (which
layers to checkpoint) and the planner (one block's shape) all ask these functions, so they agree.
Touches torch and `quant.NF4Linear` only.
"""

from __future__ import annotations

from torch import nn

from ..quant.linear import NF4Linear


def is_linear(m: nn.Module | None) -> bool:
    """A linear layer: nn.Linear, NF4Linear, or an adapter wrapping one (anything with a linear `base_layer`)."""
    if m is None:
        return False
    return isinstance(m, (nn.Linear, NF4Linear)) or is_linear(getattr(m, "base_layer", None))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose items all have the same class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(is_linear(m) for m in mod[0].modules()) and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no list of decoder blocks containing nn.Linear layers")
    return best


def block_linear_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer inside the decoder blocks (the layers that get quantized)."""
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{name}" for name, mod in layers.named_modules() if is_linear(mod) and not name.endswith(".base_layer")]


def weight_owner(name: str) -> tuple[str | None, str | None]:
    """'a.b.weight' -> ('a.b', 'weight'); 'a.b.weight.absmax' -> ('a.b', 'weight.absmax'); else (None, None)."""
    if name.endswith(".weight"):
        return name[: -len(".weight")], "weight"
    i = name.rfind(".weight.")
    return (name[:i], name[i + 1 :]) if i >= 0 else (None, None)


def quantized_prefixes(names) -> dict[str, str]:
    """Module prefix -> quant type, for every 4-bit weight present in a checkpoint."""
    out = {}
    for n in names:
        head, sep, qt = n.partition(".weight.quant_state.bitsandbytes__")
        if sep:
            out[head] = qt
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` is; returns `new`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def quantized_linears(model: nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
