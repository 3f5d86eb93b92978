"""Write a random-weight bf16 checkpoint shaped like a known model, for speed and memory benchmarks.

    python scripts/make_random_model.py --preset llama-2-7b --layers 8 --tokenizer DIR --out DIR

Weights are N(0, 0.02) (norms 1, biases 0): the matmul shapes and the step's arithmetic are those of
the real model, which is all a throughput or memory benchmark measures (the loss is meaningless).
`--layers` keeps the per-layer shapes but fewer decoder layers, so a benchmark fits in a short GPU
lease. The tokenizer (and chat template) are copied from `--tokenizer`, and the vocabulary is sized to
it so that its ids index the embedding. Generated on CUDA when there is one; written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qlora_engine.errors import QloraError  # noqa: E402
from qlora_engine.models.synthetic import random_checkpoint  # noqa: E402
from qlora_engine.plan.presets import preset_config  # noqa: E402


def make(preset: str, layers: int | None, tokenizer: Path, out: Path, force: bool = False) -> Path:
    from transformers import AutoTokenizer

    cfg = preset_config(preset)
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg["vocab_size"] = max(len(AutoTokenizer.from_pretrained(tokenizer)), 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random_checkpoint(out, cfg, std=0.02, tokenizer=tokenizer, device=device, force=force)
    print(f"wrote {out}: {preset} shapes, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, help="a planner preset, e.g. llama-2-7b, llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--tokenizer", required=True, type=Path, help="a checkpoint directory to take the tokenizer from")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    try:
        make(a.preset, a.layers, a.tokenizer, a.out, a.force)
    except (QloraError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
