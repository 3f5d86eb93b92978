"""`qlora plan` (= `python -m qlora_engine.plan`): the memory plan of a run, component by component,
its verdict against a GPU, and with --maximize (or "auto" settings) the largest batch size,
sequence length or rank that fits. It takes every run key `finetune` takes, with the same meaning.
"""

from __future__ import annotations

import json

from . import args


def build_parser(prog: str = "qlora plan"):
    p = args.parser(prog, "Memory plan of a QLoRA run: --model (a preset such as llama-3.1-8b, a hub id, a config.json "
                          "or a checkpoint dir), --gpu or --gpu-memory, plus --config run.yaml and any run key.")  # fmt: skip
    g = p.add_argument_group("plan")
    g.add_argument("--gpu", help="GPU name from the table (4090, a100-80gb, h100, ...; --list shows them)")
    g.add_argument("--gpu-memory", help="capacity instead of a GPU name, e.g. 24GiB")
    g.add_argument("--maximize", choices=("batch", "seq_len", "seq-len", "rank"), help="the largest of these that fits")
    g.add_argument("--margin", type=float, default=0.05, help="fraction of the GPU kept free [0.05]")
    g.add_argument("--gpus", type=int, default=1, help="GPUs (one process each); with --strategy ddp|fsdp, or auto: "
                                                       "the plan of each, and which fits [1]")  # fmt: skip
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--list", action="store_true", help="list the GPUs and model presets")
    args.add_run_flags(p)
    return p


def run(argv: list[str]) -> int:
    from ..machine import fmt_bytes, parse_size
    from ..plan import gpus, presets, shapes
    from ..plan.memory import PlanError, plan_memory
    from ..plan.solver import choose_strategy, default_target, solve, suggestions

    a = build_parser().parse_args(argv)
    if a.list:
        print("GPUs:", ", ".join(f"{g.name} ({fmt_bytes(g.total_bytes)})" for g in gpus.GPUS))
        print("models:", ", ".join(presets.PRESETS))
        return 0
    cfg = args.run_config(a)
    gpu = gpus.find_gpu(a.gpu) if a.gpu else None
    capacity = gpu.total_bytes if gpu else parse_size(a.gpu_memory) if a.gpu_memory else None
    if not 0 <= a.margin < 1:
        raise PlanError(f"--margin must be in [0, 1), got {a.margin}")
    maximize = a.maximize.replace("-", "_") if a.maximize else None
    if a.gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {a.gpus}")
    explanation, strategies, p = None, None, None
    if a.gpus > 1 and cfg.strategy == "auto":
        chosen, plans = choose_strategy(cfg, cfg.model, capacity, a.gpus, a.margin)
        strategies = "; ".join(f"{s}{' with the base offloaded' * (p.knobs.offload_base is True)}: {p.verdict()}"
                               for s, p in plans.items())  # fmt: skip
        cfg, p = cfg.replace(strategy=chosen), plans[chosen]
    if maximize or "auto" in (cfg.batch_size, cfg.seq_len):
        if capacity is None:
            raise PlanError("choosing batch_size/seq_len/rank needs a GPU: give --gpu NAME or --gpu-memory SIZE")
        cfg, p, explanation = solve(cfg, cfg.model, capacity, maximize or default_target(cfg), a.margin, gpus=a.gpus)
    elif p is None:
        p = plan_memory(cfg, cfg.model, capacity, "cuda", a.margin, a.gpus)
    tips = [] if p.fits or a.gpus > 1 else suggestions(shapes.load_shape(cfg.model), p.knobs, capacity, a.margin)
    if a.json:
        extra = {"gpu": gpu and gpu.name, "explanation": explanation, "would_fit": tips, "strategies": strategies}
        print(json.dumps(p.to_json() | extra, indent=2, default=str))
        return 0
    print(p.table() + (f"\nGPU: {gpu.name}" + f" x {a.gpus}" * (a.gpus > 1) if gpu else "")
          + (f"\nstrategy: {cfg.strategy} ({strategies})" if strategies else "")
          + (f"\nchoice: {explanation}" if explanation else ""))
    if tips:
        print("would fit:\n  " + "\n  ".join(tips))
    return 0


def console() -> int:
    """The `qlora-plan` console script of earlier versions: `qlora plan`."""
    import sys

    from . import main

    return main(["plan", *sys.argv[1:]])
