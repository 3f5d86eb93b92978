"""Checkpoint (directory or hub id) -> model with an NF4 base, streamed one tensor at a time.

The model is built on the meta device (no storage), every `nn.Linear` inside the decoder blocks is
swapped for an `NF4Linear`, then tensors are read one by one and each linear weight is quantized on
the target device as it arrives. Embeddings, `lm_head`, norms and biases stay 16-bit. Checkpoints
already saved in 4 bits (transformers + bitsandbytes, or `qlora_engine.quantize`) load as they are.
`load_plain` loads a checkpoint as it is (an export, say): transformers for 16-bit weights, this
loader for 4-bit ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..progress import Progress
from ..quant import nf4, ops
from ..quant.linear import NF4Linear
from .hub import load_config, resolve_model
from .structure import block_linear_names, quantized_prefixes, replace_module, weight_owner
from .tensorfiles import list_tensors, read_tensor

log = logging.getLogger(__name__)


# The dtype every base is built in: training computes in it, and an export rebuilt for an adapter must match.
BASE_DTYPE = torch.bfloat16


@dataclass
class QuantSpec:
    """How linear weights are quantized when the checkpoint is 16-bit."""

    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = True


def check_finite(t: torch.Tensor, entry) -> torch.Tensor:
    """`t`, or a one-line InputError naming the file and tensor when it holds NaN or Inf (which
    quantization would spread over a whole block)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{entry.file}: tensor {entry.name} holds {bad} NaN/Inf value(s) of {t.numel()}; the checkpoint "
                         "is damaged, restore it from the original")  # fmt: skip
    return t


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


def _keep_fp32(model: nn.Module, name: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") or name.startswith(k) for k in keep)


class Placer:
    """Where the loader puts what it reads: every tensor whole, on one device. A sharding placer
    (`train.distributed`) overrides these to keep only each process's part."""

    def __init__(self, device):
        self.device = torch.device(device)

    def prepare(self, model: nn.Module, quant_layers: dict[str, QuantSpec]) -> None:
        """Called once the model skeleton (meta device, NF4 shells) is built, before any tensor is read."""

    def quantized(self, layer: NF4Linear, name: str, packed: torch.Tensor, state) -> None:
        layer.set_quantized(packed.to(self.device), state.to(self.device))

    def tensor(self, model: nn.Module, name: str, t: torch.Tensor) -> bool:
        return _set_tensor(model, name, t.to(self.device))

    def unfilled(self, model: nn.Module) -> list[str]:
        return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]

    def finish(self, model: nn.Module) -> None:
        for name, buf in list(model.named_buffers()):
            if buf.device != self.device:
                _set_tensor(model, name, buf.to(self.device))


def load_model(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = BASE_DTYPE,
    quant: QuantSpec | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    placer: Placer | None = None,
) -> nn.Module:
    """Load a causal LM (a checkpoint directory or a hub id) with every decoder-block linear in NF4
    on `device` (or wherever `placer` puts it).

    Peak host memory: one tensor of the checkpoint plus whatever of the model lives on the host.
    """
    quant = quant or QuantSpec()
    try:
        nf4.check_blocksize(quant.blocksize)
    except ValueError as e:
        raise InputError(str(e)) from None
    model_dir = resolve_model(model, allow_pickle)
    placer = placer or Placer(device)
    device = placer.device
    config = load_config(model_dir)
    entries = list_tensors(model_dir, allow_pickle)
    prequant = quantized_prefixes(entries)
    model = empty_model(config, dtype)

    if prequant:
        targets = sorted(prequant)
    else:
        targets = block_linear_names(model)
    for name in targets:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise InputError(f"{model_dir}: {name} is quantized in the checkpoint but is a {type(lin).__name__} in the model")
        replace_module(model, name, NF4Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta", dtype=dtype))
    target_set = set(targets)
    _tie_embeddings(model, config)
    placer.prepare(model, {n: _layer_spec(entries, n, prequant, quant) for n in targets})

    pending: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantized parts waiting for the rest of their layer
    unexpected = []
    order = sorted(entries.values(), key=lambda e: (str(e.file), e.offset))
    bar = Progress(len(order), f"loading {model_dir.name}" + (" (quantizing to 4 bits)" * (not prequant)), "tensors",
                   enabled=progress)
    for e in order:
        bar.update()
        owner, part = weight_owner(e.name)
        if owner in target_set:
            layer = model.get_submodule(owner)
            if prequant:
                parts = pending.setdefault(owner, {})
                parts[part] = read_tensor(e)
                _maybe_finish_prequant(layer, owner, parts, pending, placer)
            else:
                w = check_finite(read_tensor(e), e).to(device=device, dtype=dtype)
                packed, state = ops.quantize_weight(w, quant.blocksize, quant.quant_type, quant.double_quant)
                del w
                placer.quantized(layer, owner, packed, state)
            continue
        t = read_tensor(e)
        if t.is_floating_point():
            t = check_finite(t, e).to(dtype=torch.float32 if _keep_fp32(model, e.name) else dtype)
        if not placer.tensor(model, e.name, t):
            unexpected.append(e.name)
    bar.close()

    if pending:
        raise InputError(f"{model_dir}: incomplete 4-bit state for {sorted(pending)[:3]} (missing absmax/quant_map/quant_state keys)")
    _tie_embeddings(model, config)
    missing = placer.unfilled(model)
    if missing:
        raise InputError(f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if unexpected:
        log.warning("%s: ignored %d checkpoint tensor(s) the model does not have, e.g. %s", model_dir, len(unexpected), unexpected[:3])
    placer.finish(model)
    model.requires_grad_(False)
    model.qlora_source = str(model_dir)
    model.qlora_base = "nf4"
    model.qlora_quant = {"prequantized": bool(prequant), **quant.__dict__}
    _load_generation_config(model, model_dir)
    return model


def check_checkpoint(model, allow_pickle: bool = False) -> Path:
    """The checkpoint directory of `model` (a directory or hub id), its config.json and every
    weight file's header checked: what fails here fails in one line before any long load."""
    model_dir = resolve_model(model, allow_pickle)
    load_config(model_dir)
    list_tensors(model_dir, allow_pickle)
    return model_dir


def quant_state(entries: dict, name: str) -> dict:
    """The bitsandbytes quant_state (blocksize, quant_type, shape, ...) of 4-bit layer `name` in a checkpoint."""
    blob = next(e for n, e in entries.items() if n.startswith(f"{name}.weight.quant_state.bitsandbytes__"))
    return json.loads(bytes(read_tensor(blob).numpy().tobytes()))


def checkpoint_spec(entries: dict, name: str) -> QuantSpec:
    """The QuantSpec of 4-bit layer `name` as the checkpoint's bytes hold it."""
    q = quant_state(entries, name)
    return QuantSpec(int(q["blocksize"]), q["quant_type"], "nested_offset" in q)


def _layer_spec(entries: dict, name: str, prequant: dict, quant: QuantSpec) -> QuantSpec:
    """How layer `name` is (or will be) quantized: the checkpoint's own state when it is 4-bit."""
    return checkpoint_spec(entries, name) if prequant else quant


def _maybe_finish_prequant(layer: NF4Linear, owner: str, parts: dict, pending: dict, placer: Placer) -> None:
    blob = [k for k in parts if k.startswith("weight.quant_state.")]
    if "weight" not in parts or not blob:
        return
    meta = json.loads(bytes(parts[blob[0]].numpy().tobytes()))
    need = {"weight.absmax", "weight.quant_map"} | ({"weight.nested_absmax", "weight.nested_quant_map"} if "nested_offset" in meta else set())
    if not need <= parts.keys():
        return
    state = nf4.QuantState.from_state_dict(parts, "weight")
    try:
        placer.quantized(layer, owner, parts["weight"], state)
    except ValueError as e:
        raise InputError(f"{owner}: {e}") from None
    del pending[owner]


def _tie_embeddings(model: nn.Module, config) -> None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        out.weight = inp.weight  # before sharding (one shared parameter) and again after a load replaced it


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    if (model_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)


def is_4bit_checkpoint(model_dir: str | Path) -> bool:
    """Whether the checkpoint holds 4-bit (bitsandbytes-format) weights."""
    return bool(quantized_prefixes(list_tensors(Path(model_dir))))


def load_dense(model: str | Path, device="cpu", dtype: torch.dtype = BASE_DTYPE, allow_pickle: bool = False) -> nn.Module:
    """A 16-bit base as transformers loads it, frozen: the base of plain LoRA (`base: bf16`)."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(model, allow_pickle)
    load_config(model_dir)  # one-line error for a bad directory
    if is_4bit_checkpoint(model_dir):
        raise InputError(f"{model_dir} is a 4-bit checkpoint: a 16-bit base needs the 16-bit checkpoint")
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=not allow_pickle or None).to(device)
    m.requires_grad_(False)
    m.qlora_source, m.qlora_base = str(model_dir), "bf16"
    return m


def load_plain(model: str | Path, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A checkpoint as it is, for inference: transformers for 16-bit weights (in their own dtype
    unless given), this loader for a 4-bit checkpoint; eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(model)
    config = load_config(model_dir)
    if is_4bit_checkpoint(model_dir):
        return load_model(model_dir, device, dtype or BASE_DTYPE).eval()
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtype or names.get(str(getattr(config, "dtype", None) or "").replace("torch.", ""), BASE_DTYPE)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
