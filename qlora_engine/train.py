"""The training loop, written out: build, (resume), then for each optimizer step accumulate
micro-batches, clip, step, log, evaluate, checkpoint.

Checkpoints (`output_dir/checkpoints/step-NNNNNNNN/`) hold the adapter in PEFT format, the
optimizer, the schedule, every RNG state and the data position, written to a temporary directory
and renamed. `resume` continues from the newest one; on the CPU the resumed run repeats the
uninterrupted one bit for bit. SIGINT/SIGTERM save a checkpoint after the current step and exit;
a NaN/Inf loss stops before the optimizer step, leaving the last checkpoint as it was.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data as data_mod
from . import attention, default_model, lora, optim, recompute, tensorfiles
from . import plan as plan_mod
from .config import RunConfig
from .loader import QuantSpec, load_model
from .loss import causal_lm_loss

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
EXIT_INTERRUPTED, EXIT_NONFINITE = 130, 3
HELDOUT_SAMPLES = 64


class TrainingStopped(RuntimeError):
    """Training ended early (non-finite loss); the message says why and what is intact."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available here; use --device cpu")
    return dev


def build_model(cfg: RunConfig, device: torch.device):
    """(model with LoRA, tokenizer, model_dir): the NF4 base (or bf16 for comparison) + adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model.resolve(cfg.model)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir} has no tokenizer files; copy tokenizer.json / tokenizer_config.json from the original checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.base == "nf4":
        model = load_model(model_dir, device, torch.bfloat16, QuantSpec(cfg.blocksize, cfg.quant_type, cfg.double_quant))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        model.requires_grad_(False)
        model.qlora_source = str(model_dir)
    dtype = torch.bfloat16 if cfg.lora_dtype == "bf16" else torch.float32
    lora.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.target_modules, dtype, seed=cfg.seed)
    attention.use_varlen(model)  # packed samples attended one by one: exact, and Σlen² instead of T²
    return model, tokenizer, model_dir


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: torch.device, chunk: int) -> dict:
    """Mean loss over every target token of the eval set, and its perplexity. Touches no RNG."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with _autocast(device):
            loss, n = causal_lm_loss(model, b, chunk=chunk)
        total += float(loss) * n
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one user message, through the chat template when the tokenizer has one."""
    from .generate import generate

    return generate(model, tokenizer, question, max_new_tokens)


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch (epoch, index)."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens: int = 0


def list_checkpoints(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / CHECKPOINTS
    return sorted(p for p in d.glob("step-*") if p.is_dir() and (p / "state.pt").exists()) if d.exists() else []


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, pos: Position, cfg: RunConfig, keep: int, base: str) -> Path:
    final = Path(out_dir) / CHECKPOINTS / f"step-{pos.step:08d}"
    with tensorfiles.atomic_directory(final, force=True) as tmp:
        lora.save_adapter(model, tmp, base)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "position": pos.__dict__, "config": cfg.flat()},
                   tmp / "state.pt")  # fmt: skip
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Position:
    _, weights = lora.read_adapter(path)
    layers = lora.lora_layers(model)
    if set(weights) != set(layers):
        raise ValueError(f"{path}: the checkpoint adapts other layers than this run; resume with the config it was made with")
    with torch.no_grad():
        for name, (A, B) in weights.items():
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    state = torch.load(path / "state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])


class _Signals:
    """First SIGINT/SIGTERM: finish the step, save, exit. A second one: stop at once."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Metrics:
    """metrics.jsonl (one JSON object per line) and TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = Path(out_dir) / METRICS
        if resume_step is not None and self.path.exists():  # drop what a killed run logged past its checkpoint
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            tensorfiles.write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except Exception:  # tensorboard is optional
            pass

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Result:
    steps: int
    adapter_dir: Path | None
    eval_before: dict | None = None
    eval_after: dict | None = None
    answer_before: str | None = None
    answer_after: str | None = None
    tokens_per_second: float = 0.0
    peak_memory: int = 0
    interrupted: bool = False
    history: list = field(default_factory=list)


def train(cfg: RunConfig, out=print) -> Result:
    """Run one fine-tuning job per `cfg`. `out` receives the human-readable report lines."""
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    ckpts = list_checkpoints(out_dir)
    if cfg.resume and not ckpts:
        raise ValueError(f"resume asked for, but {out_dir / CHECKPOINTS} holds no checkpoint")
    if ckpts and not cfg.resume and not cfg.dry_run:
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume to continue, or choose another output_dir")
    set_seed(cfg.seed)
    model, tokenizer, model_dir = build_model(cfg, device)
    if cfg.resume:  # the settings a checkpoint was trained with, never a new solve
        saved = torch.load(ckpts[-1] / "state.pt", weights_only=False)["config"]
        cfg = cfg.replace(batch_size=saved["batch_size"], seq_len=saved["seq_len"])
    cfg, mem_plan, why = plan_mod.resolve_auto(cfg, model_dir, device)
    out(why)
    prepared = data_mod.prepare(cfg, tokenizer)
    seq_len = int(cfg.seq_len)
    out(f"data: {cfg.data} ({prepared.fmt}): train {prepared.train.summary()}; eval {prepared.eval.summary()}")
    if cfg.dry_run:
        color = sys.stdout.isatty()
        for i, s in enumerate(prepared.train.samples[:2]):
            out(f"--- sample {i} ({sum(t != data_mod.IGNORE for t in s.targets)} of {len(s.ids)} tokens trained on, marked {'green' if color else '«»'}) ---")
            out(data_mod.show_sample(tokenizer, s, color))
        return Result(steps=0, adapter_dir=None)

    rows = data_mod.make_rows(prepared.train.samples, seq_len, cfg.packing)
    batch_size = int(cfg.batch_size)
    batches = data_mod.Batches(rows, batch_size, cfg.seed, tokenizer.pad_token_id)
    eval_bs = cfg.eval_batch_size or batch_size
    eval_batches = data_mod.eval_batches(data_mod.make_rows(prepared.eval.samples, seq_len, cfg.packing), eval_bs, tokenizer.pad_token_id)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.per_epoch / cfg.grad_accum))

    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing != "auto" else device.type == "cuda"
    if checkpointing:
        recompute.enable(model, offload=cfg.offload_activations)
    params = [p for _, p in lora.trainable_parameters(model)]
    optimizer, optim_name = optim.build(params, cfg.optim, cfg.lr, cfg.weight_decay, device)
    scheduler = optim.schedule(optimizer, cfg.schedule, optim.warmup_steps(cfg.warmup, total_steps), total_steps)
    n_params = sum(p.numel() for p in params)
    out(f"model: {model_dir.name} ({cfg.base} base) on {device}; LoRA r={cfg.lora_r} on {len(lora.lora_layers(model))} layers, "
        f"{n_params / 1e6:.2f}M trainable params ({cfg.lora_dtype}); optimizer {optim_name}; "
        f"checkpointing {'on' + (' + offload' if cfg.offload_activations else '') if checkpointing else 'off'}")  # fmt: skip
    out(f"plan: {total_steps} steps x {cfg.grad_accum} micro-batches x {batch_size} rows of <= {seq_len} tokens "
        f"({len(rows)} rows per epoch, {'packed' if cfg.packing else 'one sample per row'})")  # fmt: skip

    result = Result(steps=0, adapter_dir=None)
    pos = Position()
    if cfg.resume:
        pos = load_checkpoint(ckpts[-1], model, optimizer, scheduler)
        out(f"resumed from {ckpts[-1]} at step {pos.step}")
    metrics = Metrics(out_dir, pos.step if cfg.resume else None)
    out_dir.mkdir(parents=True, exist_ok=True)

    def quiet(fn, *a):  # evaluation and sampling must not move any RNG the training uses
        state = rng_state()
        try:
            return fn(*a)
        finally:
            set_rng_state(state)

    if not cfg.resume:
        result.eval_before = quiet(evaluate, model, eval_batches, device, cfg.loss_chunk)
        out(f"eval before training: loss {result.eval_before['eval_loss']:.4f}, ppl {result.eval_before['eval_ppl']:.2f}")
        metrics.log({"step": 0, **result.eval_before})
        if cfg.sample_prompt:
            result.answer_before = quiet(answer, model, tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)
            out(f"sample before: Q: {cfg.sample_prompt}\n               A: {result.answer_before}")

    model.train()
    stream = batches.stream(pos.epoch, pos.index)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _bar(total_steps, pos.step, out)
    t_start, tokens_start = time.perf_counter(), pos.tokens
    with _Signals() as signals:
        while pos.step < total_steps:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_step = sum(int((b["targets"] != data_mod.IGNORE).sum()) for _, _, b in micro)
            step_loss = 0.0
            for k, (_, _, b) in enumerate(micro):
                b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
                with _autocast(device):
                    loss, _ = causal_lm_loss(model, b, n_norm=n_step, chunk=cfg.loss_chunk)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    last = list_checkpoints(out_dir)
                    where = f"the last good checkpoint, {last[-1]}, is intact" if last else "no checkpoint had been saved yet"
                    raise TrainingStopped(f"loss became {loss_value} at step {pos.step + 1} (micro-batch {k}); {where}. "
                                          f"Lower lr or max_grad_norm, or check the data.")  # fmt: skip
                loss.backward()
                step_loss += loss_value
                pos.tokens += int(b["position_ids"].numel())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            pos.epoch, pos.index = _advance(micro, batches)
            elapsed = time.perf_counter() - t_start
            tps = (pos.tokens - tokens_start) / max(elapsed, 1e-9)
            record = {"step": pos.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": tps, "peak_mem": peak_memory(device), "epoch": pos.epoch + pos.index / batches.per_epoch}  # fmt: skip
            if pos.step % cfg.log_every == 0 or pos.step == total_steps:
                metrics.log({k: v for k, v in record.items() if k not in ("tokens_per_s", "peak_mem")} | {"tokens_per_s": round(tps, 1)})
            result.history.append(record)
            bar.update(record)
            if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < total_steps:
                ev = quiet(evaluate, model, eval_batches, device, cfg.loss_chunk)
                metrics.log({"step": pos.step, **ev})
                bar.write(f"step {pos.step}: eval loss {ev['eval_loss']:.4f}, ppl {ev['eval_ppl']:.2f}")
            stop = signals.received is not None
            if (cfg.save_every and pos.step % cfg.save_every == 0) or stop:
                path = save_checkpoint(out_dir, model, optimizer, scheduler, pos, cfg, cfg.keep_checkpoints, str(model_dir))
                if stop:
                    bar.close()
                    out(f"stopped by signal {signals.received} after step {pos.step}; checkpoint saved to {path}; "
                        f"continue with --resume")  # fmt: skip
                    result.interrupted, result.steps = True, pos.step
                    return result
    bar.close()
    result.steps = pos.step
    result.tokens_per_second = (pos.tokens - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
    result.peak_memory = peak_memory(device)
    out(plan_mod.peak_report(mem_plan, device))
    result.eval_after = quiet(evaluate, model, eval_batches, device, cfg.loss_chunk)
    metrics.log({"step": pos.step, **result.eval_after})
    if cfg.save_every and pos.step % cfg.save_every:
        save_checkpoint(out_dir, model, optimizer, scheduler, pos, cfg, cfg.keep_checkpoints, str(model_dir))
    final = out_dir / ADAPTER
    with tensorfiles.atomic_directory(final, force=True) as tmp:
        lora.save_adapter(model, tmp, str(model_dir), extra={"steps": pos.step, "data": cfg.data, "eval_data": cfg.eval_data,
                                                              "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                                                              "blocksize": cfg.blocksize, "quant_type": cfg.quant_type,
                                                              "double_quant": cfg.double_quant, "base": cfg.base})  # fmt: skip
        # the held-out samples as token ids, so an export can be checked on exactly this text
        heldout = [s.ids for s in prepared.eval.samples[:HELDOUT_SAMPLES]]
        (tmp / lora.HELDOUT).write_text(json.dumps({"tokenizer": str(model_dir), "samples": heldout}) + "\n")
    result.adapter_dir = final
    out(f"eval after {pos.step} steps: loss {result.eval_after['eval_loss']:.4f}, ppl {result.eval_after['eval_ppl']:.2f}"
        + (f" (before: {result.eval_before['eval_loss']:.4f})" if result.eval_before else ""))  # fmt: skip
    out(f"throughput {result.tokens_per_second:.0f} tokens/s; peak {'GPU' if device.type == 'cuda' else 'host'} memory "
        f"{result.peak_memory / 2**30:.2f} GiB; adapter saved to {final}")  # fmt: skip
    if cfg.sample_prompt:
        result.answer_after = quiet(answer, model, tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)
        out(f"sample after:  Q: {cfg.sample_prompt}\n               A: {result.answer_after}")
    return result


def _advance(micro, batches: data_mod.Batches) -> tuple[int, int]:
    """The position after the last micro-batch taken."""
    epoch, index, _ = micro[-1]
    index += 1
    return (epoch + 1, 0) if index >= batches.per_epoch else (epoch, index)


class _bar:
    """tqdm progress bar with loss, lr, tokens/s and peak memory (silent when stderr is not a terminal)."""

    def __init__(self, total: int, initial: int, out):
        from tqdm.auto import tqdm

        self.out = out
        self.t = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty()
                      and not os.environ.get("QLORA_ENGINE_PROGRESS"))  # fmt: skip

    def update(self, r: dict) -> None:
        self.t.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}",
                           mem=f"{r['peak_mem'] / 2**30:.2f}G", refresh=False)  # fmt: skip
        self.t.update(1)

    def write(self, s: str) -> None:
        if self.t.disable:
            self.out(s)
        else:
            self.t.write(s)

    def close(self) -> None:
        self.t.close()
