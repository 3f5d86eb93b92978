"""LoRA adapters on disk in PEFT's format, and models rebuilt from them.

`save_adapter` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's file names,
keys and config, so `peft.PeftModel.from_pretrained` loads them (linear layers as `lora_A.weight` /
`lora_B.weight`, convolutions the same with conv-shaped tensors, embeddings as `lora_embedding_A` /
`lora_embedding_B`), plus `qlora_engine.json`: how the base was built in training (NF4 with its
block size, or 16-bit), which PEFT ignores. `load_with_adapter` rebuilds exactly the trained model:
that base, plus the adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..models import tensorfiles
from ..models.hub import resolve_model
from ..models.loader import QuantSpec, load_dense, load_model
from ..models.structure import replace_module
from .inject import CLASSES, lora_layers
from .layers import LoraLayer, layer_kind

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HELDOUT = "heldout_ids.json"  # the run's held-out samples as token ids, for checking an export
PROVENANCE = "qlora_engine.json"  # how the adapter was trained (base quantization, data); PEFT ignores it
PEFT_PREFIX = "base_model.model."


def peft_key(name: str, kind: str, ab: str) -> str:
    """PEFT's key of one adapter tensor: `...q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`."""
    return f"{PEFT_PREFIX}{name}.lora_embedding_{ab}" if kind == "embedding" else f"{PEFT_PREFIX}{name}.lora_{ab}.weight"


def peft_state_dict(model: nn.Module, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's key names; `values` (by the model's own names, `x.lora_A`)
    replaces the layers' tensors (e.g. the whole tensors gathered from a sharded model)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for ab, t in (("A", layer.lora_A), ("B", layer.lora_B)):
            out[peft_key(name, layer.kind, ab)] = values[f"{name}.lora_{ab}"] if values is not None else t.detach()
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


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None, extra: dict | None = None,
                 values: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ `extra` as qlora_engine.json) into
    `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensorfiles.save_file(out_dir / ADAPTER_WEIGHTS, {k: v.contiguous() for k, v in peft_state_dict(model, values).items()})
    tensorfiles.write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    if extra:
        tensorfiles.write_text_atomic(out_dir / PROVENANCE, json.dumps(extra, indent=2) + "\n")
    return out_dir


def _json_object(path: Path) -> dict:
    """An adapter's JSON file as a dict, or a one-line InputError naming it."""
    why = ""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        data, why = None, f" ({e.msg}, line {e.lineno})"
    except UnicodeDecodeError:
        data = None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a valid JSON object{why}; the adapter is damaged, save it again")
    return data


def read_provenance(adapter_dir: str | Path) -> dict:
    """How an adapter was trained (base kind and quantization, data), {} when unknown."""
    p = Path(adapter_dir) / PROVENANCE
    if p.exists():
        return _json_object(p)
    cfg = Path(adapter_dir) / ADAPTER_CONFIG
    return _json_object(cfg).get("qlora_engine", {}) if cfg.exists() else {}


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, {layer name: (A, B)}) of a PEFT LoRA adapter directory, with one-line errors."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise InputError(f"{p} is missing: an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = _json_object(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise InputError(f"{adapter_dir}: only plain LoRA adapters are supported (peft_type={cfg.get('peft_type')}, use_dora={cfg.get('use_dora')})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensorfiles.load_file(w_path).items():
        m = (re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
             or re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_embedding_([AB])(?:\.default)?", key))  # fmt: skip
        if not m:
            raise InputError(f"{w_path}: unexpected tensor {key} (not a lora_A/lora_B weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    incomplete = [n for n, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise InputError(f"{w_path}: layer {incomplete[0]} has only one of lora_A/lora_B")
    return cfg, {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}


def check_adapter_fits(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter_dir) -> None:
    """Every adapted layer exists in `model` with matching shapes, or a one-line error naming it."""
    for name, (A, B) in weights.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{adapter_dir}: adapter layer {name} does not exist in this base model (trained on a different base?)") from None
        if isinstance(layer, LoraLayer):
            layer = layer.base_layer
        kind = layer_kind(layer)
        if kind is None:
            raise InputError(f"{adapter_dir}: adapter layer {name} is a {type(layer).__name__} in this base model, which "
                             "LoRA cannot adapt")  # fmt: skip
        want = _ab_shapes(layer, kind, A.shape[0])
        if (tuple(A.shape), tuple(B.shape)) != want:
            raise InputError(f"{adapter_dir}: adapter layer {name} has A {tuple(A.shape)}, B {tuple(B.shape)} but this base "
                             f"layer needs {want[0]}, {want[1]} (trained on a different base?)")  # fmt: skip


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> list[str]:
    """Put a saved adapter onto `model` (which has none yet); returns the adapted layer names."""
    cfg, weights = read_adapter(adapter_dir)
    check_adapter_fits(model, weights, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    dropout, rslora = cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False)
    for name, (A, B) in sorted(weights.items()):
        r, alpha = A.shape[0], adapter_alpha(cfg, name)
        base = model.get_submodule(name)
        layer = CLASSES[layer_kind(base)](base, r, alpha, dropout, rslora, dtype or A.dtype)
        replace_module(model, name, layer)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    r0 = next(iter(weights.values()))[0].shape[0]
    model.qlora_lora = {"r": r0, "lora_alpha": cfg["lora_alpha"], "lora_dropout": dropout, "use_rslora": rslora,
                        "targets": sorted(weights)}  # fmt: skip
    return sorted(weights)


def _ab_shapes(base: nn.Module, kind: str, r: int) -> tuple[tuple, tuple]:
    """The (A, B) shapes an adapter of rank r on `base` has."""
    if kind == "embedding":
        return (r, base.num_embeddings), (base.embedding_dim, r)
    if kind == "conv":
        k = tuple(base.kernel_size)
        return (r, base.in_channels, *k), (base.out_channels, r, *([1] * len(k)))
    return (r, base.in_features), (base.out_features, r)


def adapter_alpha(cfg: dict, name: str) -> float:
    """A layer's alpha: PEFT's alpha_pattern by the layer's last name part, else lora_alpha."""
    return cfg.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], cfg["lora_alpha"])


def provenance(adapter_dir: str | Path) -> tuple[str, QuantSpec, bool]:
    """(base kind "nf4" or "bf16", QuantSpec, whether training recorded them) for an adapter.

    Adapters saved by training record how their base was built (`read_provenance`); others (e.g.
    from PEFT) get the engine's defaults, NF4 blocksize 64 with double quantization.
    """
    info = read_provenance(adapter_dir)
    kind = info.get("base", "nf4")
    if kind not in ("nf4", "bf16"):
        raise InputError(f"{adapter_dir}: the adapter's provenance names base {kind!r}; expected nf4 or bf16")
    spec = QuantSpec(int(info.get("blocksize", 64)), info.get("quant_type", "nf4"), bool(info.get("double_quant", True)))
    return kind, spec, bool(info)


def adapter_base(adapter_dir: str | Path) -> Path:
    """The base checkpoint an adapter names (base_model_name_or_path), as a directory."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise InputError(f"{cfg_path} is missing: an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    name = _json_object(cfg_path).get("base_model_name_or_path")
    if not name:
        raise InputError(f"{cfg_path} names no base model: pass --model")
    return resolve_model(name)


def load_with_adapter(base: str | Path, adapter_dir: str | Path, device="cpu") -> nn.Module:
    """The model an adapter was trained as: its base built as in training (NF4 with the recorded
    spec, or 16-bit for plain LoRA), plus the adapter; eval mode."""
    kind, spec, _ = provenance(adapter_dir)
    model = load_model(base, device, quant=spec) if kind == "nf4" else load_dense(base, device)
    load_adapter(model, adapter_dir)
    return model.eval()  # the engine's LoRA dropout is off outside training; nothing else changes
