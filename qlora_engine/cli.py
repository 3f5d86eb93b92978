"""The finetune command: arguments -> RunConfig -> train (-> export), with one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_yaml, parse_args

DEMO_CONFIG = Path(__file__).parent / "data" / "demo.yaml"


def finetune_main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from .data import DataError
    from .train import EXIT_INTERRUPTED, EXIT_NONFINITE, TrainingStopped, train

    demo = not argv
    try:
        cfg = parse_args(argv, "scripts/finetune.py", "QLoRA fine-tuning", defaults=load_yaml(DEMO_CONFIG) if demo else None)
        if demo:
            print(f"no arguments: running the demo ({DEMO_CONFIG})", flush=True)
        result = train(cfg, out=lambda s: print(s, flush=True))
        if result.interrupted:
            return EXIT_INTERRUPTED
        if cfg.export and result.adapter_dir is not None:
            from .export import export_after_training

            export_after_training(cfg, result, out=lambda s: print(s, flush=True))
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
