"""Peak host memory of a merged export (`python -m qlora_engine.export`), next to the 16-bit model size.

    python scripts/export_memory.py                      # cached SmolLM2-135M-Instruct + a synthetic adapter
    python scripts/export_memory.py --model DIR --adapter DIR [--dtype fp16] [--max-shard-size 500MB]

The export runs in a subprocess whose peak resident set is measured (`machine.child_peak_rss`, VmHWM); a
second subprocess does everything but the tensors (imports, config, the empty model on the meta
device) and gives the baseline. The export streams
tensor by tensor, so its growth over the baseline should be about the largest tensor plus buffers,
well below one copy of the model. No fidelity report (--no-report): that one loads the models.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys
from qlora_engine.cli import main
from qlora_engine.models import hub, loader
mode, args = sys.argv[1], sys.argv[2:]
if mode == "baseline":
    if "--format" in args and args[args.index("--format") + 1].startswith("gguf"):
        import gguf, numpy  # what a GGUF export imports besides
    loader.empty_model(hub.load_config(args[args.index("--model") + 1]), loader.BASE_DTYPE)
elif main(["export", *args]) != 0:
    sys.exit(1)
"""


def peak_rss(mode: str, export_args: list[str]) -> tuple[int, float]:
    from qlora_engine.machine import child_peak_rss

    t0 = time.perf_counter()
    try:
        peak = child_peak_rss(CHILD, [mode, *export_args])
    except RuntimeError as e:
        sys.exit(f"error: the {mode} run failed: {e}")
    return peak, time.perf_counter() - t0


def synthetic_adapter(model_dir: Path, out: Path, r: int) -> Path:
    """LoRA rank r on every decoder-block linear with random nonzero B, saved as training saves it."""
    import torch

    from qlora_engine import add_lora, load_model, save_adapter
    from qlora_engine.lora import lora_layers

    model = load_model(model_dir)
    add_lora(model, r, 2.0 * r, seed=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.01)
    extra = {"base": "nf4", "blocksize": 64, "quant_type": "nf4", "double_quant": True, "data": "synthetic"}
    return save_adapter(model, out, str(model_dir), extra=extra)


def weight_bytes(model_dir: Path) -> int:
    from qlora_engine.models.tensorfiles import checkpoint_files

    return sum(p.stat().st_size for p in checkpoint_files(model_dir))


def largest_tensor(model_dir: Path) -> tuple[str, int]:
    from qlora_engine.models.tensorfiles import list_tensors

    e = max(list_tensors(model_dir).values(), key=lambda e: e.nbytes)
    return e.name, e.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="16-bit base checkpoint (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="adapter directory (default: a synthetic rank-16 adapter on every linear)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--rank", type=int, default=16, help="rank of the synthetic adapter")
    a = ap.parse_args()
    if not os.path.exists("/proc/self/status"):
        sys.exit("error: needs Linux /proc to read the peak resident set")

    import torch

    from qlora_engine import resolve_model
    from qlora_engine.machine import describe, fmt_bytes

    model_dir = resolve_model(a.model or "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(prefix="export-memory-") as tmp:
        tmp = Path(tmp)
        adapter = Path(a.adapter) if a.adapter else synthetic_adapter(model_dir, tmp / "adapter", a.rank)
        args = ["--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp / "merged"), "--dtype", a.dtype,
                "--max-shard-size", a.max_shard_size, "--no-report"]  # fmt: skip
        base_rss, _ = peak_rss("baseline", args)
        peak, seconds = peak_rss("export", args)
        out_bytes = weight_bytes(tmp / "merged")
    model_bytes = weight_bytes(model_dir)
    name, biggest = largest_tensor(model_dir)
    growth = peak - base_rss
    print(f"| 16-bit model | export written | largest tensor | baseline RSS | export peak RSS | growth | growth / model |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| {fmt_bytes(model_bytes)} | {fmt_bytes(out_bytes)} ({a.dtype}) | {fmt_bytes(biggest)} ({name}) | "
          f"{fmt_bytes(base_rss)} | {fmt_bytes(peak)} | {fmt_bytes(growth)} | {growth / model_bytes:.2f} |")  # fmt: skip
    print()
    print(f"export: {seconds:.1f} s wall (with interpreter start); baseline = imports + config + empty model, no tensors")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"export run: python -m qlora_engine.export {shlex.join(args)}")
    print(f"machine: {describe('cpu')}, Python {platform.python_version()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
