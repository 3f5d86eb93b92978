"""Putting LoRA into any `nn.Module`: which layers `target_modules` selects, wrapping them,
freezing the rest, and loralib's helpers (a LoRA-only state dict, merge/unmerge).

Adaptable layers: `nn.Linear` and `NF4Linear` (`LoraLinear`), `nn.Embedding` (`LoraEmbedding`),
`nn.Conv1d`/`nn.Conv2d` (`LoraConv`). "all-linear" means every linear layer of the decoder blocks
(or, in a model without decoder blocks, every linear layer except the output embeddings); a list
names layers by PEFT's rule and may name embeddings and convolutions too.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError
from ..models.structure import block_linear_names, replace_module
from .layers import LoraConv, LoraEmbedding, LoraLayer, layer_kind
from .linear import LoraLinear

_REGEX_CHARS = set("*?[]()|^$+\\")
CLASSES = {"linear": LoraLinear, "embedding": LoraEmbedding, "conv": LoraConv}


def _candidates(model: nn.Module) -> dict[str, str]:
    """name -> kind of every module LoRA could adapt (not already adapted, not inside an adapter)."""
    out = {}
    for name, m in model.named_modules():
        if name.endswith(".base_layer") or ".base_layer." in name or isinstance(m, LoraLayer):
            continue
        kind = layer_kind(m)
        if kind:
            out[name] = kind
    return out


def target_names(model: nn.Module, target_modules="all-linear") -> list[str]:
    """Full names of the layers `target_modules` selects.

    A list entry matches a layer whose name equals it or ends with "." + it (PEFT's rule); an entry
    with regex characters must match the whole name, or its tail after a dot.
    """
    cands = _candidates(model)
    linears = [n for n, k in cands.items() if k == "linear"]
    if target_modules == "all-linear":
        try:
            in_blocks = set(block_linear_names(model))
            return [n for n in linears if n in in_blocks]
        except ValueError:
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            return [n for n in linears if model.get_submodule(n) is not out]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen = []
    for name in cands:
        for pat in target_modules:
            if set(pat) & _REGEX_CHARS:
                if re.fullmatch(pat, name) or re.fullmatch(r"(.*\.)?" + pat, name):
                    chosen.append(name)
                    break
            elif name == pat or name.endswith("." + pat):
                chosen.append(name)
                break
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in cands})
        raise InputError(f"target_modules {target_modules} matched no layer LoRA can adapt (Linear, Embedding, Conv1d, "
                         f"Conv2d); this model has: {', '.join(kinds)}")  # fmt: skip
    return chosen


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, use_rslora: bool = False,
             target_modules="all-linear", dtype: torch.dtype = torch.bfloat16, seed: int | None = None,
             merge_on_eval: bool = False) -> list[str]:  # fmt: skip
    """Wrap the selected layers in LoRA layers and freeze everything else; returns their names.

    `dtype`: of the LoRA weights. `merge_on_eval`: merge into dense bases on `eval()` and unmerge on
    `train()` (loralib's merge_weights). Works on any nn.Module: a transformers model, an MLP, a CNN.
    """
    names = target_names(model, target_modules)
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        cls = CLASSES[layer_kind(base)]
        replace_module(model, name, cls(base, r, alpha, dropout, use_rslora, dtype, merge_on_eval=merge_on_eval))
    model.qlora_lora = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora, "targets": names}
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """loralib's: freeze everything but the LoRA tensors (and biases: "all", or "lora_only" for
    the biases of adapted layers)."""
    if bias not in ("none", "all", "lora_only"):
        raise InputError(f"bias must be none, all or lora_only, got {bias!r}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora_layers(model).values():
            b = getattr(layer.base_layer, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """loralib's: only the LoRA tensors, under the model's own state-dict names (`...q_proj.lora_A`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict` back into a model with the same adapters; a one-line error when
    names or shapes differ."""
    own = lora_state_dict(model)
    if set(own) != set(state):
        diff = sorted(set(own) ^ set(state))
        raise InputError(f"the LoRA state dict does not fit this model ({len(diff)} names differ, e.g. {diff[0]})")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise InputError(f"LoRA tensor {k} has shape {tuple(v.shape)}, this model's is {tuple(own[k].shape)}")
            own[k].copy_(v)


def merge_lora(model: nn.Module, keep_original: bool = True) -> list[str]:
    """Merge every adapter on a 16-bit base into its weight (see `LoraLayer.merge`); returns the
    merged names. Adapters on 4-bit bases are left as they are (export merges those exactly)."""
    done = []
    for name, layer in lora_layers(model).items():
        if layer.can_merge:
            layer.merge(keep_original)
            done.append(name)
    return done


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()
