"""`qlora finetune`: flags and config file -> RunConfig -> `run.finetune` (plan, train, export).

With no --config and no --data, the demo's settings (`qlora_engine/data/demo.yaml`) are the
defaults, and the demo can run any number of times: an interrupted demo run is resumed, a finished
one is started over, and the first line says which.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from . import args

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "data" / "demo.yaml"
# What a run writes into its output_dir; starting the demo over removes exactly these.
RUN_OUTPUTS = ("checkpoints", "adapter", "merged", "metrics.jsonl", "tb")


def build_parser(prog: str = "qlora finetune"):
    p = args.parser(prog, "Fine-tune a causal LM with QLoRA: NF4 base, LoRA on every linear layer, adapter in PEFT "
                          "format. Every run key is also a flag; flags override --config. With no --config and no "
                          "--data: the demo (qlora_engine/data/demo.yaml).")  # fmt: skip
    args.add_run_flags(p)
    return p


def demo_start(cfg, out) -> object:
    """The demo's output_dir: resume an interrupted demo run, start a finished one over; say which."""
    from ..train.checkpoint import list_checkpoints

    out_dir = Path(cfg.output_dir)
    ckpts = list_checkpoints(out_dir)
    finished = (out_dir / "adapter").exists() or any(p.name == f"step-{cfg.max_steps:08d}" for p in ckpts)
    if ckpts and not finished and not cfg.dry_run:
        out(f"demo: resuming the interrupted demo run in {out_dir} from {ckpts[-1].name}")
        return cfg.replace(resume=True)
    if out_dir.exists() and any((out_dir / n).exists() for n in RUN_OUTPUTS) and not cfg.dry_run:
        out(f"demo: {out_dir} holds an earlier demo run; starting over")
        for name in RUN_OUTPUTS:
            p = out_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    else:
        out(f"demo: fine-tuning into {out_dir}")
    return cfg


def preflight(cfg) -> None:
    """The checks a demo run's flags can fail (the device, the model's config and checkpoint
    headers), made before the demo starts an earlier run over; each fails with its one line."""
    from ..machine import resolve_device
    from ..models.loader import check_checkpoint

    resolve_device(cfg.device)
    check_checkpoint(cfg.model, cfg.allow_pickle)


def run(argv: list[str]) -> int:
    from ..progress import quiet_third_party
    from ..run import finetune
    from ..train.config import load_yaml
    from ..train.recipe import EXIT_INTERRUPTED

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "bitsandbytes", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    quiet_third_party()
    ns = build_parser().parse_args(argv)
    demo = "config" not in ns and "data" not in ns
    cfg = args.run_config(ns, load_yaml(DEMO_CONFIG) if demo else None)

    def out(s: str) -> None:
        print(s, flush=True)

    if demo:
        out(f"no --config or --data: running the demo ({DEMO_CONFIG.name})")
        if not cfg.resume:
            preflight(cfg)  # a bad --model or --device must not cost the earlier demo run
            cfg = demo_start(cfg, out)
    result = finetune(cfg, out=out)
    return EXIT_INTERRUPTED if result.interrupted else 0
