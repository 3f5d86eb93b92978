"""`python -m qlora_engine.quantize --model DIR --out DIR`: write a 4-bit checkpoint in the
bitsandbytes/transformers format (sharded safetensors + index, `config.json` with
`quantization_config`, tokenizer and chat template copied), loadable by
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` with bitsandbytes installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .loader import QuantSpec, load_model
from .sizes import parse_size
from .tensorfiles import atomic_directory, copy_side_files, save_tensors


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


def quantize_checkpoint(model_dir: Path, out: Path, quant: QuantSpec, device: str = "cpu",
                        max_shard_bytes: int = 5 << 30, force: bool = False) -> Path:
    """Stream-load `model_dir`, quantizing each decoder-block linear, and write it to `out` atomically."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force to replace it")
    model = load_model(model_dir, device=device, quant=quant, progress=sys.stderr.isatty())
    if model.qlora_quant["prequantized"]:
        raise ValueError(f"{model_dir} is already a 4-bit checkpoint: nothing to quantize")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant)
    with atomic_directory(out, force=force) as tmp:
        save_tensors(tmp, state_items(model), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(model_dir, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_engine.quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="16-bit Hugging Face checkpoint directory")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    ap.add_argument("--blocksize", type=int, default=64, help="first-level block size (32..4096)")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--no-double-quant", action="store_true", help="keep float32 absmax (4.5 instead of 4.127 bits/param)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to quantize")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    a = ap.parse_args(argv)
    try:
        quant = QuantSpec(blocksize=a.blocksize, quant_type=a.quant_type, double_quant=not a.no_double_quant)
        out = quantize_checkpoint(Path(a.model), Path(a.out), quant, a.device, parse_size(a.max_shard_size), a.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
