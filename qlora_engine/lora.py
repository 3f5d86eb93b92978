"""LoRA adapters: which layers get them, putting them in, and PEFT's on-disk format.

Works on any `nn.Module`: the linear layers (`nn.Linear` or `NF4Linear`) named by `target_modules`
are wrapped in `LoraLinear`; "all-linear" means every linear layer of the decoder blocks (or, in a
model without decoder blocks, every linear layer except the output embeddings). Saved adapters use
PEFT's file names, keys and config, so `peft.PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from . import tensorfiles
from .linear import LoraLinear, NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HELDOUT = "heldout_ids.json"  # the run's held-out samples as token ids, for checking an export
PROVENANCE = "qlora_engine.json"  # how the adapter was trained (base quantization, data); PEFT ignores it
PEFT_PREFIX = "base_model.model."
_REGEX_CHARS = set("*?[]()|^$+\\")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and not n.endswith(".base_layer")]


def target_names(model: nn.Module, target_modules="all-linear") -> list[str]:
    """Full names of the linear layers `target_modules` selects.

    A list entry matches a layer whose name equals it or ends with "." + it (PEFT's rule); an entry
    with regex characters must match the whole name, or its tail after a dot.
    """
    from .loader import block_linear_names

    linears = _linear_names(model)
    if target_modules == "all-linear":
        try:
            return [n for n in block_linear_names(model) if n in set(linears)]
        except ValueError:
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            return [n for n in linears if model.get_submodule(n) is not out]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen = []
    for name in linears:
        for pat in target_modules:
            if set(pat) & _REGEX_CHARS:
                if re.fullmatch(pat, name) or re.fullmatch(r"(.*\.)?" + pat, name):
                    chosen.append(name)
                    break
            elif name == pat or name.endswith("." + pat):
                chosen.append(name)
                break
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target_modules {target_modules} matched no linear layer; this model has: {', '.join(kinds)}")
    return chosen


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
             target_modules="all-linear", dtype: torch.dtype = torch.bfloat16, seed: int | None = None) -> list[str]:
    """Wrap the selected linear layers in LoraLinear; freeze everything else. Returns the layer names."""
    names = target_names(model, target_modules)
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _wrap(model, name, lambda base: LoraLinear(base, r, alpha, dropout, use_rslora, dtype))
    model.qlora_lora = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora, "targets": names}
    return names


def _wrap(model: nn.Module, name: str, make) -> LoraLinear:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    layer = make(getattr(owner, child))
    setattr(owner, child, layer)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    return out


def adapter_config(model: nn.Module, base_model: str | None) -> dict:
    """A PEFT LoraConfig: target_modules lists the full layer names, so PEFT adapts exactly these."""
    info = model.qlora_lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": info["r"],
        "lora_alpha": info["lora_alpha"],
        "lora_dropout": info["lora_dropout"],
        "use_rslora": info["use_rslora"],
        "target_modules": sorted(lora_layers(model)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None, extra: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ `extra` as qlora_engine.json) into
    `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensorfiles.save_file(out_dir / ADAPTER_WEIGHTS, {k: v.contiguous() for k, v in lora_state_dict(model).items()})
    tensorfiles.write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    if extra:
        tensorfiles.write_text_atomic(out_dir / PROVENANCE, json.dumps(extra, indent=2) + "\n")
    return out_dir


def read_provenance(adapter_dir: str | Path) -> dict:
    """How an adapter was trained (base kind and quantization, data), {} when unknown."""
    p = Path(adapter_dir) / PROVENANCE
    if p.exists():
        return json.loads(p.read_text())
    cfg = Path(adapter_dir) / ADAPTER_CONFIG
    return json.loads(cfg.read_text()).get("qlora_engine", {}) if cfg.exists() else {}


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, {layer name: (A, B)}) of a PEFT LoRA adapter directory, with one-line errors."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported (peft_type={cfg.get('peft_type')}, use_dora={cfg.get('use_dora')})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensorfiles.load_file(w_path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not m:
            raise ValueError(f"{w_path}: unexpected tensor {key} (not a lora_A/lora_B weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    incomplete = [n for n, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"{w_path}: layer {incomplete[0]} has only one of lora_A/lora_B")
    return cfg, {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}


def check_adapter_fits(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter_dir) -> None:
    """Every adapted layer exists in `model` with matching shapes, or a one-line error naming it."""
    for name, (A, B) in weights.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{adapter_dir}: adapter layer {name} does not exist in this base model (trained on a different base?)") from None
        if isinstance(layer, LoraLinear):
            layer = layer.base_layer
        if not isinstance(layer, (nn.Linear, NF4Linear)):
            raise ValueError(f"{adapter_dir}: adapter layer {name} is a {type(layer).__name__} in this base model, not a linear layer")
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"{adapter_dir}: adapter layer {name} has A {tuple(A.shape)}, B {tuple(B.shape)} but the base layer is "
                             f"{layer.out_features}x{layer.in_features} (trained on a different base?)")  # fmt: skip


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> list[str]:
    """Put a saved adapter onto `model` (which has none yet); returns the adapted layer names."""
    cfg, weights = read_adapter(adapter_dir)
    check_adapter_fits(model, weights, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    dropout, rslora = cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False)
    for name, (A, B) in sorted(weights.items()):
        r, alpha = A.shape[0], cfg.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], cfg["lora_alpha"])
        layer = _wrap(model, name, lambda base: LoraLinear(base, r, alpha, dropout, rslora, dtype or A.dtype))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    r0 = next(iter(weights.values()))[0].shape[0]
    model.qlora_lora = {"r": r0, "lora_alpha": cfg["lora_alpha"], "lora_dropout": dropout, "use_rslora": rslora,
                        "targets": sorted(weights)}  # fmt: skip
    return sorted(weights)
