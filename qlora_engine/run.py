"""One fine-tuning run end to end, as `qlora finetune` and the Python API run it: plan the memory
(and choose "auto" settings) before anything is loaded, train with the recipe, compare the
predicted peak with the measured one, and, with `export: true`, export the merged model and answer
the sample prompt from the export.

    from qlora_engine import finetune
    result = finetune(model="SmolLM2-135M-Instruct", data="train.jsonl", max_steps=100, output_dir="runs/x")
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from . import machine
from .errors import InputError, QloraError
from .train.checkpoint import config_changes, newest_intact, saved_config
from .train.config import RunConfig
from .train.recipe import Recipe, Result


def finetune(cfg: RunConfig | None = None, *, model=None, tokenizer=None, train_data=None, eval_data=None, out=print,
             **settings) -> Result:  # fmt: skip
    """Train one adapter. `cfg`: a RunConfig (or none: the defaults); `settings`: config keys that
    override it (`lora_r=8`, `data="org/name"`, ...). `model` + `tokenizer`: your own model (say
    from `load_model`; LoRA is added unless it has adapters) instead of cfg.model. `train_data` /
    `eval_data`: a datasets.Dataset or a list of dicts instead of cfg.data / cfg.eval_data.
    `out` receives the report lines. Returns the Result (eval losses, answers, adapter directory)."""
    from .plan.solver import peak_report, resolve_auto
    from .train import distributed

    cfg = (cfg.replace(**settings) if settings else cfg) if cfg is not None else RunConfig.make(**settings)
    distributed.check_strategy(cfg, distributed.world_size())
    d = distributed.setup(cfg)  # several processes: join the group before anything else
    if d is not None and not d.main:
        out = lambda s: None  # noqa: E731 - one report, from rank 0
    failed = True
    try:
        result = _finetune(cfg, d, model, tokenizer, train_data, eval_data, out, peak_report, resolve_auto)
        failed = False
    except RuntimeError as e:
        if d is not None and not isinstance(e, QloraError):
            # the launcher SIGTERMs the survivors as soon as one process dies: say why before going
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise distributed.lost_rank(e) from e
        raise
    finally:
        if d is not None and not failed:
            d.finish()
    if cfg.export and result.adapter_dir is not None and (d is None or d.main):
        export_after_training(cfg, result, out)
    return result


def _finetune(cfg, d, model, tokenizer, train_data, eval_data, out, peak_report, resolve_auto) -> Result:
    device = d.device if d is not None else machine.resolve_device(cfg.device)
    world = d.world if d is not None else 1
    resume_from = None
    if cfg.resume:  # the settings a checkpoint was trained with, never a new solve; checked before any load
        resume_from = newest_intact(Path(cfg.output_dir), warn=out if d is None or d.main else (lambda s: None))
        saved = {"world_size": 1} | saved_config(resume_from)
        auto = {k: saved[k] for k in ("batch_size", "seq_len") if cfg.flat()[k] == "auto"}
        cfg = cfg.replace(**auto) if auto else cfg
        # a key the checkpoint predates counts as its default; data-cache and eval-cost keys change nothing trained
        changed = config_changes(RunConfig().flat() | saved, cfg.flat() | {"world_size": world})
        if saved.get("max_steps") != cfg.max_steps or saved.get("epochs") != cfg.epochs:
            out(f"resume: the run's length changed (max_steps {saved.get('max_steps')} -> {cfg.max_steps}); the "
                "learning-rate schedule is recomputed for the new length")  # fmt: skip
        if changed:
            raise InputError(f"--resume: this run's settings differ from the checkpoint's ({'; '.join(changed)}): resume "
                             "with the checkpoint's settings, or start a new output_dir")  # fmt: skip
    plan = None
    if model is not None:
        shape_source = getattr(model, "config", None)
    else:
        from .models.hub import resolve_model

        shape_source = resolve_model(cfg.model, cfg.allow_pickle)
    try:
        cfg, plan, why = resolve_auto(cfg, shape_source, device)
        out(why)
    except InputError:
        if model is None or "auto" in (cfg.batch_size, cfg.seq_len):
            raise
        out("memory plan: skipped (the planner models transformers causal LMs; this model is not one)")
    if d is not None and cfg.strategy == "auto":  # DDP when the whole base fits one device, else FSDP
        d.strategy = "ddp" if plan is None or plan.fits else "fsdp"
        out(f"strategy: {d.strategy} over {world} processes" + (" (the plan does not fit one device)" * (d.strategy == "fsdp")))
    recipe = Recipe(cfg, model, tokenizer, train_data, eval_data, out, dist=d, resume_from=resume_from)
    result = recipe.run()
    if plan is not None and not cfg.dry_run and not result.interrupted:
        out(peak_report(plan, device, recipe.rss_before_load))
    return result


def export_after_training(cfg: RunConfig, result: Result, out=print) -> dict:
    """`export: true`: merge the run's adapter onto its base into `output_dir/merged` (replacing a
    previous one), print a short fidelity summary, and answer `cfg.sample_prompt` with the exported
    model loaded by plain transformers (streamed to stdout)."""
    from .export.merge import export_merged
    from .export.report import report_rows
    from .generate import generate_text, write_stdout
    from .lora.peft_format import adapter_base
    from .models.hub import load_tokenizer
    from .models.loader import load_plain

    device = machine.resolve_device(cfg.device)
    adapter_dir = Path(result.adapter_dir)
    dest = Path(cfg.output_dir) / "merged"
    info = export_merged(adapter_base(adapter_dir), adapter_dir, dest, force=True, device=device, log=lambda s: None)
    rows = report_rows(info)
    exp, orig, floor = rows["export"], rows.get("original"), rows.get("trained_bf16")
    line = (f"export: {dest} ({info['dtype']}, {machine.fmt_bytes(info['bytes'])}); against the trained model on "
            f"{info['heldout']['positions']} held-out positions ({info['compute_dtype']} compute): KL "
            f"{exp['mean_kl']:.1e}, top-1 {100 * exp['top1_agreement']:.1f}%, ppl {exp['ppl']:.3f} "
            f"(trained {rows['trained']['ppl']:.3f})")  # fmt: skip
    if orig:
        line += f"; merged into the original weights instead: KL {orig['mean_kl']:.1e}, top-1 {100 * orig['top1_agreement']:.1f}%"
    if floor:
        line += f"; the trained model itself in bf16: KL {floor['mean_kl']:.1e}"
    out(line)
    if cfg.sample_prompt:
        model = load_plain(dest, device)
        out(f"exported model: Q: {cfg.sample_prompt}")
        write_stdout("                A: ")
        info["answer"] = generate_text(model, load_tokenizer(dest), cfg.sample_prompt, cfg.sample_max_new_tokens,
                                       on_text=write_stdout)  # fmt: skip
        write_stdout("\n")
        sys.stdout.flush()
    return info
