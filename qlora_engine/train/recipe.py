"""One fine-tuning run as a recipe: `setup()` builds (or restores) everything, `train_step()` does
one optimizer step, `evaluate()` and `save()` run at their intervals, and `run()` is the loop,
written out top to bottom. Benchmarks and the planner's validation step the same object.

The loop: for each optimizer step, accumulate `grad_accum` micro-batches (every token of the step
weighs the same), clip, step, log, evaluate, checkpoint. SIGINT/SIGTERM save a checkpoint after the
current step and stop; a NaN/Inf loss stops before the optimizer step, leaving the last checkpoint
as it was. The recipe takes a config with concrete batch_size and seq_len: "auto" is the planner's
job (`qlora_engine.run`). A caller may hand in its own model, tokenizer and in-memory data.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import machine
from ..errors import InputError, RunError
from ..lora import peft_format
from ..lora.inject import add_lora, lora_layers, mark_only_lora_as_trainable, trainable_parameters
from ..models import tensorfiles
from ..models.hub import load_tokenizer, parse_hub_id, resolve_model
from ..models.loader import QuantSpec, check_checkpoint, load_dense, load_model
from ..progress import Progress
from . import attention, distributed, optim, recompute, weights
from . import data as data_mod
from .checkpoint import (Position, list_checkpoints, load_checkpoint, newest_intact, rng_state, save_checkpoint,
                         set_rng_state, set_seed)  # fmt: skip
from .config import RunConfig
from .evaluate import autocast, evaluate
from .loss import causal_lm_loss

ADAPTER = "adapter"
METRICS = "metrics.jsonl"
EXIT_INTERRUPTED, EXIT_NONFINITE = 130, 3
HELDOUT_SAMPLES = 64


class TrainingStopped(RunError):
    """Training ended early (non-finite loss); the message says why and what is intact."""

    exit_code = EXIT_NONFINITE


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_base(cfg: RunConfig, model_dir: Path, device: torch.device, placer=None, progress: bool = True) -> nn.Module:
    """The frozen base per the config: NF4 (QLoRA), or 16-bit (plain LoRA, for comparison)."""
    if cfg.base == "nf4":
        quant = QuantSpec(cfg.blocksize, cfg.quant_type, cfg.double_quant)
        return load_model(model_dir, device, DTYPES[cfg.dtype], quant, allow_pickle=cfg.allow_pickle, placer=placer,
                          progress=progress)
    if placer is not None:
        raise InputError("FSDP shards an NF4 base; a 16-bit base (base: bf16) trains with DDP or one process")
    return load_dense(model_dir, device, DTYPES[cfg.dtype], cfg.allow_pickle)


def build_model(cfg: RunConfig, device: torch.device):
    """(model with LoRA, tokenizer, model_dir): the base per the config + adapters."""
    model_dir = resolve_model(cfg.model, cfg.allow_pickle)
    model = load_base(cfg, model_dir, device)
    add_model_lora(model, cfg)
    return model, load_tokenizer(model_dir), model_dir


def add_model_lora(model: nn.Module, cfg: RunConfig) -> None:
    """LoRA per the config, seeded; packed samples attended one by one (exact, Σlen² not T²)."""
    dtype = torch.bfloat16 if cfg.lora_dtype == "bf16" else torch.float32
    add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.target_modules, dtype, seed=cfg.seed)
    attention.use_varlen(model)


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


RUN_OUTPUTS = ("checkpoints", ADAPTER, "merged", METRICS, "tb")  # all a run writes, inside output_dir


def check_confined(out_dir: Path) -> None:
    """Every path a run writes stays inside output_dir: none of them may be a symlink that points out."""
    root = Path(out_dir).resolve()
    for name in RUN_OUTPUTS:
        p = Path(out_dir) / name
        if p.is_symlink() and root not in p.resolve().parents:
            raise InputError(f"{p} is a symlink to {p.resolve()}, outside {out_dir}: a run writes only inside its "
                             "output_dir; remove the link or choose another output_dir")  # fmt: skip


def quiet(fn, *a):
    """fn(*a) without moving any RNG the training uses (evaluation, sample answers)."""
    state = rng_state()
    try:
        return fn(*a)
    finally:
        set_rng_state(state)


def answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one user message, through the chat template when the tokenizer has one."""
    from ..generate import generate_text

    return generate_text(model, tokenizer, question, max_new_tokens)


class Recipe:
    """One run of `cfg` (batch_size and seq_len resolved). `model`/`tokenizer`: the caller's own
    (LoRA is added per the config unless the model already has adapters); `train_data` /
    `eval_data`: a datasets.Dataset or a list of dicts instead of cfg.data / cfg.eval_data.
    `out` receives the human-readable report lines."""

    def __init__(self, cfg: RunConfig, model: nn.Module | None = None, tokenizer=None, train_data=None, eval_data=None,
                 out=print, dist: distributed.Dist | None = None, resume_from: Path | None = None):  # fmt: skip
        for key in ("batch_size", "seq_len"):
            if getattr(cfg, key) == "auto":
                raise InputError(f"{key} is auto: plan it first (qlora_engine.run.finetune or `qlora plan`)")
        if model is not None and tokenizer is None:
            raise InputError("a model given to the recipe needs its tokenizer too")
        self.dist = dist  # several processes (DDP / FSDP); None: this one only
        self.cfg, self.out = cfg, out if dist is None or dist.main else (lambda s: None)
        self.model, self.tokenizer = model, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.result = Result(steps=0, adapter_dir=None)
        self.pos = Position()
        self.resume_from = resume_from  # the verified checkpoint to resume (run.finetune found it); None: look

    # ---- setup -----------------------------------------------------------------------------

    def setup(self) -> "Recipe":
        """Model, data, optimizer and schedule; restores the newest checkpoint when resuming."""
        cfg = self.cfg
        self.device = self.dist.device if self.dist else machine.resolve_device(cfg.device)
        self.world, self.rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        self.out_dir = Path(cfg.output_dir)
        ckpts = list_checkpoints(self.out_dir)
        if ckpts and not cfg.resume and not cfg.dry_run:
            raise InputError(f"{self.out_dir} already holds checkpoints: pass --resume to continue, or choose another "
                             "output_dir")  # fmt: skip
        if cfg.resume and self.resume_from is None:  # each look sha256-hashes a whole checkpoint: once a run
            self.resume_from = newest_intact(self.out_dir, self.out)
        check_confined(self.out_dir)
        set_seed(cfg.seed)
        # the data first: its errors show before a long model load (and a dry run loads no model)
        self.built_model = self.model is None
        if self.built_model:
            self.model_dir = check_checkpoint(cfg.model, cfg.allow_pickle)  # a broken header fails now, not after minutes
            self.tokenizer = load_tokenizer(self.model_dir)
        else:
            self.model_dir = Path(getattr(self.model, "qlora_source", None) or cfg.model)
        self.prepared = data_mod.prepare(cfg, self.tokenizer, self.train_data, self.eval_data, out=self.out)
        p = self.prepared
        src = cfg.data if self.train_data is None else "the given data"
        self.out(f"data: {src} ({p.fmt}): train {p.train.summary()}; eval {p.eval.summary() if p.has_eval else 'none'}")
        for note in p.notes:  # what was held out, read from or written to the data cache, what each eval costs
            self.out(note)
        if cfg.dry_run:
            return self
        self.rss_before_load = machine.rss()
        self.step_module = None  # the DDP / FSDP wrapper the training loss goes through, when distributed
        fsdp = self.dist is not None and self.dist.strategy == "fsdp"
        self.weights = weights.resolve(cfg, self.model_dir if self.built_model else getattr(self.model, "config", None),
                                       self.device, fsdp, self.world)  # pipeline / offloaded base; before the load
        if fsdp:
            if not self.built_model:
                raise InputError("FSDP builds its own sharded model from cfg.model: do not pass a model object")
            placer = distributed.ShardPlacer(self.dist, before_shard=lambda m: add_model_lora(m, cfg))
            self.model = load_base(cfg, self.model_dir, self.device, placer, progress=self.rank == 0)
            mark_only_lora_as_trainable(self.model)  # the loader froze everything, adapters included
            distributed.init_lora_shards(self.model, cfg.seed)
            self.step_module = placer.step
            distributed.initialise_root(self.step_module, self.device)
        elif self.built_model:
            self.model = load_base(cfg, self.model_dir, self.device, self.weights.placer, progress=self.rank == 0)
        if not lora_layers(self.model):
            add_model_lora(self.model, cfg)
        self.base_kind = getattr(self.model, "qlora_base", cfg.base)
        # what adapters record as their base: a hub id as given (portable), else the directory
        hub_id = self.built_model and parse_hub_id(str(cfg.model)) and not Path(cfg.model).exists()
        self.base_name = str(cfg.model) if hub_id else str(self.model_dir)
        seq_len, batch_size = int(cfg.seq_len), int(cfg.batch_size)
        pad = self.tokenizer.pad_token_id
        self.batches = p.batches(batch_size * self.world, cfg.seed, pad)  # global batches; each rank takes its slice
        self.eval_batches = data_mod.eval_batches(p.eval_rows, cfg.eval_batch_size or batch_size, pad)
        # sharded eval, summed across ranks; under FSDP every rank must run as many forwards (each one gathers)
        self.eval_pad = -(-len(self.eval_batches) // self.world) - len(self.eval_batches[self.rank :: self.world])
        self.eval_batches = self.eval_batches[self.rank :: self.world]
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches.per_epoch / cfg.grad_accum))
        dev = self.device
        self.checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing != "auto" else dev.type == "cuda"
        if self.checkpointing:
            recompute.enable(self.model, offload=cfg.offload_activations)
        if pipeline_line := self.weights.attach(self.model):  # after recompute: the pipeline hooks each block's call
            self.out(pipeline_line)
        if self.dist is not None and not fsdp:
            self.step_module = distributed.wrap_ddp(self.model, self.dist)
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.optimizer, optim_name = optim.build(self.params, cfg.optim, cfg.lr, cfg.weight_decay, dev)
        warmup = optim.warmup_steps(cfg.warmup, self.total_steps)
        self.scheduler = optim.schedule(self.optimizer, cfg.schedule, warmup, self.total_steps)
        n_params = sum(p.numel() for p in self.params)
        ckpt = ("on" + (" + offload" if cfg.offload_activations else "")) if self.checkpointing else "off"
        self.out(f"model: {self.model_dir.name} ({self.base_kind} base) on {dev}; LoRA r={cfg.lora_r} on "
                 f"{len(lora_layers(self.model))} layers, {n_params / 1e6:.2f}M trainable params ({cfg.lora_dtype}); "
                 f"optimizer {optim_name}; checkpointing {ckpt}")  # fmt: skip
        ranks = f" x {self.world} processes ({self.dist.strategy})" if self.dist else ""
        self.out(f"plan: {self.total_steps} steps x {cfg.grad_accum} micro-batches x {batch_size} rows{ranks} of <= "
                 f"{seq_len} tokens ({p.describe_rows(seq_len)}, {'packed' if cfg.packing else 'one sample per row'})")  # fmt: skip
        if fsdp:
            local, total = distributed.resident_nf4_bytes(self.model)
            self.out(f"fsdp: this process holds {local:,} of the {total:,} bytes of NF4 codes and scales "
                     f"({machine.fmt_bytes(local)}, {local / total:.1%})")
        if self.resume_from is not None:
            if fsdp:
                self.pos = distributed.load_sharded(self.resume_from, self.model, self.step_module, self.optimizer,
                                                    self.scheduler)  # fmt: skip
            else:
                self.pos = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
            self.out(f"resumed from {self.resume_from} at step {self.pos.step}")
        self.metrics = Metrics(self.out_dir, self.pos.step if cfg.resume else None) if self.rank == 0 else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    # ---- the pieces ------------------------------------------------------------------------

    def train_step(self, micro: list[dict]) -> dict:
        """One optimizer step over `micro` (the step's micro-batches); returns its metrics record."""
        cfg, pos, d = self.cfg, self.pos, self.dist
        if d is not None:  # the global batches, this rank's slice of the rows
            per = int(cfg.batch_size)
            micro = [{k: v[self.rank * per : (self.rank + 1) * per] for k, v in b.items()} for b in micro]
        n_step = sum(int((b["targets"] != data_mod.IGNORE).sum()) for b in micro)
        if d is not None:  # gradients are averaged over ranks: normalise by the step's global count / world
            n_step = d.all_sum(n_step) / d.world
        step_loss = 0.0
        for k, b in enumerate(micro):
            b = {key: v.to(self.device, non_blocking=True) for key, v in b.items()}
            last_micro = k == len(micro) - 1
            with autocast(self.device), self._sync(last_micro):
                loss, _ = self.loss(b, n_step)
            loss_value = float(loss.detach())
            bad = not math.isfinite(loss_value)
            if d is not None:
                bad = d.any(bad)
            if bad:
                last = list_checkpoints(self.out_dir)
                where = f"the last good checkpoint, {last[-1]}, is intact" if last else "no checkpoint had been saved yet"
                raise TrainingStopped(f"loss became {loss_value} at step {pos.step + 1} (micro-batch {k}); {where}. "
                                      "Lower lr or max_grad_norm, or check the data.")  # fmt: skip
            with self._sync(last_micro):
                loss.backward()
            step_loss += loss_value
            pos.tokens += int(b["position_ids"].numel()) * self.world
        if d is not None:
            step_loss = d.all_sum(step_loss) / d.world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        return {"step": pos.step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def loss(self, batch: dict, n_norm: float):
        """(loss, target count) of one micro-batch, through the DDP / FSDP wrapper when there is one."""
        if self.step_module is not None:
            return self.step_module(batch, n_norm, self.cfg.loss_chunk)
        return causal_lm_loss(self.model, batch, n_norm=n_norm, chunk=self.cfg.loss_chunk)

    def saved_config(self) -> dict:
        """What a checkpoint records of the run: every key, and how many processes shared it."""
        return self.cfg.flat() | {"world_size": self.world}

    def _sync(self, last_micro: bool):
        """Gradient accumulation: reduce gradients across ranks only on a step's last micro-batch."""
        import contextlib

        if self.dist is None or last_micro:
            return contextlib.nullcontext()
        if self.dist.strategy == "ddp":
            return self.step_module.no_sync()
        return distributed.no_reduce(self.step_module)

    def evaluate(self) -> dict | None:
        """Loss and perplexity on the eval rows (None when there are none), with a progress line and its cost."""
        if not self.prepared.has_eval:
            return None
        t0 = time.perf_counter()
        bar = Progress(len(self.eval_batches), "eval", "batch", enabled=self.rank == 0)
        fsdp = self.dist is not None and self.dist.strategy == "fsdp"
        with distributed.unsharded_root(self.step_module if fsdp else None):
            ev = quiet(evaluate, self.model, _counted(self.eval_batches, bar), self.device, self.cfg.loss_chunk)
            if fsdp and self.eval_pad:  # every rank runs as many forwards (each gathers); this one is not counted
                quiet(evaluate, self.model, self.eval_batches[:1] * self.eval_pad, self.device, self.cfg.loss_chunk)
        bar.close()
        if self.dist is not None:  # each rank evaluated its share: the totals over all of them
            total = self.dist.all_sum(ev["eval_loss"] * ev["eval_tokens"])
            count = self.dist.all_sum(ev["eval_tokens"])
            loss = total / max(count, 1)
            ev = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}
        return ev | {"eval_seconds": round(time.perf_counter() - t0, 2)}

    def save(self) -> Path:
        """A resumable checkpoint of the current position."""
        if self.dist is not None and self.dist.strategy == "fsdp":
            return distributed.save_sharded(self.dist, self.out_dir, self.model, self.step_module, self.optimizer,
                                            self.scheduler, self.pos, self.saved_config(), self.cfg.keep_checkpoints,
                                            self.base_name)  # fmt: skip
        path = Path(self.out_dir) / "checkpoints" / f"step-{self.pos.step:08d}"
        if self.rank == 0:  # DDP: every rank holds the same adapter, optimizer state and RNG states
            save_checkpoint(self.out_dir, self.model, self.optimizer, self.scheduler, self.pos, self.saved_config(),
                            self.cfg.keep_checkpoints, self.base_name)  # fmt: skip
        if self.dist is not None:
            self.dist.barrier()
        return path

    def save_adapter(self) -> Path:
        """The final adapter in PEFT format (with provenance and held-out ids), replacing an earlier one."""
        cfg = self.cfg
        final = self.out_dir / ADAPTER
        extra = {"steps": self.pos.step, "data": cfg.data, "eval_data": cfg.eval_data, "eval_fraction": cfg.eval_fraction,
                 "seed": cfg.seed, "blocksize": cfg.blocksize, "quant_type": cfg.quant_type,
                 "double_quant": cfg.double_quant, "base": self.base_kind, "dtype": cfg.dtype}  # fmt: skip
        values = distributed.gathered_lora(self.model) if self.dist is not None else None  # a collective under FSDP
        if self.rank == 0:
            with tensorfiles.atomic_directory(final, force=True) as tmp:
                peft_format.save_adapter(self.model, tmp, self.base_name, extra=extra, values=values)
                # the held-out samples as token ids, so an export can be checked on exactly this text
                heldout = [s.ids for s in self.prepared.eval.samples[:HELDOUT_SAMPLES]]
                (tmp / peft_format.HELDOUT).write_text(json.dumps({"tokenizer": str(self.model_dir), "samples": heldout}) + "\n")
        if self.dist is not None:
            self.dist.barrier()
        return final

    def sample(self) -> str | None:
        """The greedy answer to the sample prompt. DDP: rank 0 answers while the others wait; FSDP:
        every rank runs the same generation (its blocks are gathered collectively)."""
        fsdp = self.dist is not None and self.dist.strategy == "fsdp"
        answer_text = None
        if self.rank == 0 or fsdp:
            with distributed.unsharded_root(self.step_module if fsdp else None):
                answer_text = quiet(answer, self.model, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_max_new_tokens)
        if self.dist is not None:
            self.dist.barrier()
        return answer_text

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> Result:
        if not hasattr(self, "device"):
            self.setup()
        cfg, out, result, pos = self.cfg, self.out, self.result, self.pos
        if cfg.dry_run:
            color = sys.stdout.isatty()
            for i, s in enumerate(self.prepared.train.samples[:2]):
                trained = sum(t != data_mod.IGNORE for t in s.targets)
                out(f"--- sample {i} ({trained} of {len(s.ids)} tokens trained on, marked {'green' if color else '«»'}) ---")
                out(data_mod.show_sample(self.tokenizer, s, color))
            return result
        if not cfg.resume:
            result.eval_before = self.evaluate()
            if result.eval_before is not None:
                out(f"eval before training: {_eval_line(result.eval_before)}")
                self._log({"step": 0, **result.eval_before})
            if cfg.sample_prompt:
                result.answer_before = self.sample()
                out(f"sample before: Q: {cfg.sample_prompt}\n               A: {result.answer_before}")

        self.model.train()
        stream = self.batches.stream(pos.epoch, pos.index)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = Progress(self.total_steps, "training", "step", initial=pos.step, every=cfg.log_every, enabled=self.rank == 0)
        t_start, tokens_start = time.perf_counter(), pos.tokens
        with _Signals() as signals:
            while pos.step < self.total_steps:
                taken = [next(stream) for _ in range(cfg.grad_accum)]
                record = self.train_step([b for _, _, b in taken])
                pos.epoch, pos.index = _advance(taken, self.batches)
                tps = (pos.tokens - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
                record |= {"tokens_per_s": tps, "peak_mem": machine.peak_memory(self.device),
                           "epoch": pos.epoch + pos.index / self.batches.per_epoch}  # fmt: skip
                if pos.step % cfg.log_every == 0 or pos.step == self.total_steps:
                    logged = {k: v for k, v in record.items() if k not in ("tokens_per_s", "peak_mem")}
                    self._log(logged | {"tokens_per_s": round(tps, 1)})
                result.history.append(record)
                bar.update(loss=record["loss"], lr=record["lr"], tok_s=round(tps),
                           mem=machine.fmt_bytes(record["peak_mem"]))  # fmt: skip
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < self.total_steps:
                    ev = self.evaluate()
                    if ev is not None:
                        self._log({"step": pos.step, **ev})
                        bar.write(f"step {pos.step}: eval {_eval_line(ev)}")
                stop = signals.received is not None
                if self.dist is not None:  # every rank stops after the same step, or the collectives hang
                    stop = self.dist.any(stop)
                if (cfg.save_every and pos.step % cfg.save_every == 0) or stop:
                    path = self.save()
                    if stop:
                        bar.close()
                        out(f"stopped by signal {signals.received} after step {pos.step}; checkpoint saved to {path}; "
                            "continue with --resume")  # fmt: skip
                        result.interrupted, result.steps = True, pos.step
                        return result
        bar.close()
        result.steps = pos.step
        result.tokens_per_second = (pos.tokens - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
        result.peak_memory = machine.peak_memory(self.device)
        result.eval_after = self.evaluate()
        if result.eval_after is not None:
            self._log({"step": pos.step, **result.eval_after})
        if cfg.save_every and pos.step % cfg.save_every:
            self.save()
        result.adapter_dir = self.save_adapter()
        before = f" (before: {result.eval_before['eval_loss']:.4f})" if result.eval_before else ""
        if result.eval_after is not None:
            out(f"eval after {pos.step} steps: {_eval_line(result.eval_after)}{before}")
        where = "GPU" if self.device.type == "cuda" else "host"
        out(f"throughput {result.tokens_per_second:.0f} tokens/s; peak {where} memory "
            f"{result.peak_memory / 2**30:.2f} GiB; adapter saved to {result.adapter_dir}")  # fmt: skip
        if cfg.sample_prompt:
            result.answer_after = self.sample()
            out(f"sample after:  Q: {cfg.sample_prompt}\n               A: {result.answer_after}")
        return result


def _counted(batches, bar: Progress):
    """The eval batches, counted on the progress line as each is taken."""
    for b in batches:
        yield b
        bar.update()


def _eval_line(ev: dict) -> str:
    """An eval result with what it cost: 'loss 2.5724, ppl 13.10 (639 tokens scored, 1.2 s)'."""
    return f"loss {ev['eval_loss']:.4f}, ppl {ev['eval_ppl']:.2f} ({ev['eval_tokens']:,} tokens scored, {ev['eval_seconds']:.1f} s)"


def _advance(taken, batches: data_mod.Batches) -> tuple[int, int]:
    """The position after the last micro-batch taken."""
    epoch, index, _ = taken[-1]
    index += 1
    return (epoch + 1, 0) if index >= batches.per_epoch else (epoch, index)
