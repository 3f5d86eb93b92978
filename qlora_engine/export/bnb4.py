"""Checkpoints in the bitsandbytes/transformers 4-bit format: sharded safetensors + index, a
`config.json` with `quantization_config`, tokenizer and chat template copied. They load with
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (bitsandbytes installed) and with the
engine's loader as they are. `quantize_checkpoint` is `qlora quantize`; `write_requantized` writes
an export quantized again (`qlora export --quantize`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..models.hub import resolve_model
from ..models.loader import QuantSpec, load_model
from ..models.structure import weight_owner
from ..models.tensorfiles import (ShardedWriter, TensorEntry, atomic_directory, check_not_inside, check_replaceable,
                                  copy_side_files, list_tensors, read_tensor, save_tensors)  # fmt: skip
from ..quant import ops


def quantization_config(quant: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The `quantization_config` entry transformers writes for a bnb 4-bit model."""
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    return cfg.to_dict()


def state_items(model) -> list[tuple[str, torch.Tensor]]:
    """The model's state dict in bnb keys, tied duplicates dropped (as transformers saves them)."""
    seen: set[tuple] = set()
    items = []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        items.append((name, t))
    return items


def quantize_checkpoint(model: str | Path, out: str | Path, quant: QuantSpec | None = None, device="cpu",
                        max_shard_bytes: int = 5 << 30, force: bool = False, allow_pickle: bool = False) -> Path:
    """Stream-load `model` (a directory or hub id), quantizing each decoder-block linear, and write
    it to `out` atomically."""
    out, quant = Path(out), quant or QuantSpec()
    check_not_inside(out, {"model": resolve_model(model, allow_pickle)})
    if out.exists() and not force:
        raise InputError(f"{out} already exists: choose another --out or pass --force to replace it")
    if out.exists():
        check_replaceable(out)  # before the long load, not after it
    loaded = load_model(model, device=device, quant=quant, allow_pickle=allow_pickle)
    model_dir = Path(loaded.qlora_source)
    if loaded.qlora_quant["prequantized"]:
        raise InputError(f"{model_dir} is already a 4-bit checkpoint: nothing to quantize")
    model = loaded
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant)
    with atomic_directory(out, force=force) as tmp:
        save_tensors(tmp, state_items(model), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(model_dir, tmp)
    return out


def write_requantized(export_dir: Path, out_dir: Path, quantized: list[str], quant: QuantSpec, dtype: torch.dtype,
                      max_shard_bytes: int, device="cpu") -> None:
    """The export quantized to NF4 in the bitsandbytes layout (what `qlora_engine.quantize` writes), streamed.

    The quant-state JSON holds the double-quant offset, whose printed length is known only after
    quantizing, and shard headers come first: so one pass plans (quantizing each weight and keeping
    only the sizes), a second quantizes again and writes.
    """
    todo = set(quantized)
    entries = sorted(list_tensors(export_dir).values(), key=lambda e: (str(e.file), e.offset))

    def parts(e: TensorEntry):
        owner, part = weight_owner(e.name)
        if part != "weight" or owner not in todo:
            return [(e.name, read_tensor(e))]
        packed, state = ops.quantize_weight(read_tensor(e).to(device), quant.blocksize, quant.quant_type, quant.double_quant)
        return [(e.name, packed)] + [(f"{owner}.{k}", t) for k, t in state.state_dict("weight").items()]

    specs = []
    for e in entries:
        if weight_owner(e.name)[0] in todo:
            specs += [(n, t.dtype, tuple(t.shape)) for n, t in parts(e)]
        else:
            specs.append((e.name, e.dtype, e.shape))
    out_dir.mkdir()
    writer = ShardedWriter(out_dir, specs, max_shard_bytes)
    for e in entries:
        for n, t in parts(e):
            writer.write(n, t.cpu())
    writer.close()
    config = json.loads((export_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(export_dir, out_dir)
