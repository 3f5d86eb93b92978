"""Checkpoint directory -> model with an NF4 base, streamed one tensor at a time.

The model is built on the meta device (no storage), every `nn.Linear` inside the decoder blocks is
swapped for an `NF4Linear`, then tensors are read one by one and each linear weight is quantized on
the target device as it arrives. Embeddings, `lm_head`, norms and biases stay 16-bit. Checkpoints
already saved in 4 bits (transformers + bitsandbytes, or `qlora_engine.quantize`) load as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import nf4, ops
from .linear import LoraLinear, NF4Linear
from .tensorfiles import list_tensors, read_tensor

log = logging.getLogger(__name__)


@dataclass
class QuantSpec:
    """How linear weights are quantized when the checkpoint is 16-bit."""

    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = True


def load_config(model_dir: str | Path):
    """The transformers config of a checkpoint directory, with a one-line error when it is not one."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such checkpoint directory")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no config.json here; point --model at a Hugging Face checkpoint directory")
    return AutoConfig.from_pretrained(model_dir)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, NF4Linear, LoraLinear))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose items all have the same class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(_is_linear(m) for m in mod[0].modules()) and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no list of decoder blocks containing nn.Linear layers")
    return best


def block_linear_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer inside the decoder blocks (the layers that get quantized)."""
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{name}" for name, mod in layers.named_modules() if _is_linear(mod) and not name.endswith(".base_layer")]


def empty_model(config, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> bool:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return False
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        return False
    return True


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_prefixes(names) -> dict[str, str]:
    """Module prefix -> quant type, for every 4-bit weight present in a checkpoint."""
    out = {}
    for n in names:
        head, sep, qt = n.partition(".weight.quant_state.bitsandbytes__")
        if sep:
            out[head] = qt
    return out


def _keep_fp32(model: nn.Module, name: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") or name.startswith(k) for k in keep)


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant: QuantSpec | None = None,
    progress: bool = False,
) -> nn.Module:
    """Load a causal LM from `model_dir` with every decoder-block linear in NF4 on `device`.

    Peak host memory: one tensor of the checkpoint plus whatever of the model lives on the host.
    """
    quant = quant or QuantSpec()
    nf4.check_blocksize(quant.blocksize)
    model_dir = Path(model_dir)
    device = torch.device(device)
    config = load_config(model_dir)
    entries = list_tensors(model_dir)
    prequant = quantized_prefixes(entries)
    model = empty_model(config, dtype)

    if prequant:
        targets = sorted(prequant)
    else:
        targets = block_linear_names(model)
    for name in targets:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{model_dir}: {name} is quantized in the checkpoint but is a {type(lin).__name__} in the model")
        _swap(model, name, NF4Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta", dtype=dtype))
    target_set = set(targets)

    pending: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantized parts waiting for the rest of their layer
    unexpected = []
    order = sorted(entries.values(), key=lambda e: (str(e.file), e.offset))
    bar = _progress(order, progress, f"loading {model_dir.name}")
    for e in bar:
        owner, part = weight_owner(e.name)
        if owner in target_set:
            layer = model.get_submodule(owner)
            if prequant:
                parts = pending.setdefault(owner, {})
                parts[part] = read_tensor(e)
                _maybe_finish_prequant(layer, owner, parts, pending, device)
            else:
                w = read_tensor(e).to(device=device, dtype=dtype)
                packed, state = ops.quantize_weight(w, quant.blocksize, quant.quant_type, quant.double_quant)
                del w
                layer.set_quantized(packed, state)
            continue
        t = read_tensor(e)
        if t.is_floating_point():
            t = t.to(dtype=torch.float32 if _keep_fp32(model, e.name) else dtype)
        if not _set_tensor(model, e.name, t.to(device)):
            unexpected.append(e.name)

    if pending:
        raise ValueError(f"{model_dir}: incomplete 4-bit state for {sorted(pending)[:3]} (missing absmax/quant_map/quant_state keys)")
    _tie_embeddings(model, config)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if unexpected:
        log.warning("%s: ignored %d checkpoint tensor(s) the model does not have, e.g. %s", model_dir, len(unexpected), unexpected[:3])
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            _set_tensor(model, name, buf.to(device))
    model.requires_grad_(False)
    model.qlora_source = str(model_dir)
    model.qlora_quant = {"prequantized": bool(prequant), **quant.__dict__}
    _load_generation_config(model, model_dir)
    return model


def weight_owner(name: str) -> tuple[str | None, str | None]:
    """'a.b.weight' -> ('a.b', 'weight'); 'a.b.weight.absmax' -> ('a.b', 'weight.absmax'); else (None, None)."""
    if name.endswith(".weight"):
        return name[: -len(".weight")], "weight"
    i = name.rfind(".weight.")
    return (name[:i], name[i + 1 :]) if i >= 0 else (None, None)


def _maybe_finish_prequant(layer: NF4Linear, owner: str, parts: dict, pending: dict, device) -> None:
    blob = [k for k in parts if k.startswith("weight.quant_state.")]
    if "weight" not in parts or not blob:
        return
    meta = json.loads(bytes(parts[blob[0]].numpy().tobytes()))
    need = {"weight.absmax", "weight.quant_map"} | ({"weight.nested_absmax", "weight.nested_quant_map"} if "nested_offset" in meta else set())
    if not need <= parts.keys():
        return
    state = nf4.QuantState.from_state_dict(parts, "weight").to(device)
    try:
        layer.set_quantized(parts["weight"].to(device), state)
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    del pending[owner]


def _tie_embeddings(model: nn.Module, config) -> None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight.is_meta:
        out.weight = inp.weight


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    if (model_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


def quantized_linears(model: nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
