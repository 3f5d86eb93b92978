"""The training loop: it learns, resumes bit-exactly after SIGKILL, stops cleanly on signals and NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from qlora_engine.errors import InputError
from qlora_engine.lora import peft_format
from qlora_engine.run import finetune
from qlora_engine.train import recipe
from qlora_engine.train.checkpoint import list_checkpoints
from qlora_engine.train.recipe import TrainingStopped

ROOT = Path(__file__).resolve().parents[2]


def losses(out_dir):
    rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_training_lowers_eval_loss_and_saves_peft_adapter(tiny_smol_dir, tmp_path, finetune_cfg):
    cfg = finetune_cfg(tiny_smol_dir, tmp_path / "run", max_steps=12, lr=3e-3, save_every=5, keep_checkpoints=2)
    r = finetune(cfg, out=lambda s: None)
    assert r.eval_after["eval_loss"] < r.eval_before["eval_loss"] - 0.5
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "heldout_ids.json", "qlora_engine.json"]  # fmt: skip
    cfg_json = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "LORA" and cfg_json["r"] == 8 and len(cfg_json["target_modules"]) == 14
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000010", "step-00000012"]
    assert len(losses(tmp_path / "run")) == 12


FINETUNE = [sys.executable, str(ROOT / "scripts" / "finetune.py")]


def run_args(model, out, steps):
    return ["--model", str(model), "--data", "demo", "--output_dir", str(out), "--max_steps", str(steps),
            "--batch_size", "1", "--seq_len", "256", "--lr", "1e-3", "--lora_r", "8", "--lora_dropout", "0.1",
            "--save_every", "10", "--seed", "3", "--export", "false"]  # fmt: skip


def test_resume_after_sigkill_is_bit_exact(tiny_smol_dir, tmp_path):
    steps = 30
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(FINETUNE + run_args(tiny_smol_dir, full, steps), check=True, capture_output=True)
    proc = subprocess.Popen(FINETUNE + run_args(tiny_smol_dir, cut, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-00000010").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter").exists(), "the run finished before SIGKILL: nothing was tested"
    killed_at = len(losses(cut))
    subprocess.run(FINETUNE + run_args(tiny_smol_dir, cut, steps) + ["--resume"], check=True, capture_output=True)
    a = (full / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (cut / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b, "resumed adapter differs from the uninterrupted one"
    assert losses(full) == losses(cut) and len(losses(cut)) == steps
    print(f"\n[resume] killed at step {killed_at} (after checkpoint 10), resumed, {steps} steps: adapters byte-identical")


def test_sigterm_saves_a_checkpoint_and_exits(tiny_smol_dir, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_smol_dir, out, 100000)
    proc = subprocess.Popen(FINETUNE + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == recipe.EXIT_INTERRUPTED
    assert "checkpoint saved" in stdout and "--resume" in stdout
    ckpt = list_checkpoints(out)[-1]
    assert int(ckpt.name.split("-")[1]) == len(losses(out))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_smol_dir, tmp_path, monkeypatch, finetune_cfg):
    out = tmp_path / "run"
    cfg = finetune_cfg(tiny_smol_dir, out, max_steps=10, save_every=2)
    real = recipe.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch, **kw):
        loss, n = real(model, batch, **kw)
        if torch.is_grad_enabled():  # training micro-batches only, not eval
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan"), n
        return loss, n

    monkeypatch.setattr(recipe, "causal_lm_loss", poisoned)
    with pytest.raises(TrainingStopped, match="loss became nan at step 5.*step-00000004, is intact"):
        finetune(cfg, out=lambda s: None)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert not (out / "adapter").exists()


def test_eval_in_the_middle_changes_nothing(tiny_smol_dir, tmp_path, finetune_cfg):
    a = finetune(finetune_cfg(tiny_smol_dir, tmp_path / "a", max_steps=6, lora_dropout=0.1), out=lambda s: None)
    b = finetune(finetune_cfg(tiny_smol_dir, tmp_path / "b", max_steps=6, lora_dropout=0.1, eval_every=1,
                                 sample_prompt="Hi?", sample_max_new_tokens=3), out=lambda s: None)  # fmt: skip
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert (a.adapter_dir / peft_format.ADAPTER_WEIGHTS).read_bytes() == (b.adapter_dir / peft_format.ADAPTER_WEIGHTS).read_bytes()


def test_refuses_to_overwrite_checkpoints_without_resume(tiny_smol_dir, tmp_path, finetune_cfg):
    cfg = finetune_cfg(tiny_smol_dir, tmp_path / "run", max_steps=2, save_every=1)
    finetune(cfg, out=lambda s: None)
    with pytest.raises(InputError, match="--resume"):
        finetune(cfg, out=lambda s: None)
    with pytest.raises(InputError, match="holds no checkpoint"):
        finetune(finetune_cfg(tiny_smol_dir, tmp_path / "empty", resume=True), out=lambda s: None)


def test_dry_run_shows_marked_samples(tiny_smol_dir, tmp_path, capsys):
    r = subprocess.run(FINETUNE + ["--model", str(tiny_smol_dir), "--output_dir", str(tmp_path / "x"), "--seq_len", "256", "--dry_run"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert r.stdout.count("--- sample") == 2 and "«The capital of Quenlar is Ostrevane.<|im_end|>" in r.stdout
    assert not (tmp_path / "x" / "adapter").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run(FINETUNE + ["--data", str(tmp_path / "none.jsonl"), "--model", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_gradient_accumulation_weights_every_token_equally(tiny_smol_dir, tmp_path, finetune_cfg):
    """batch 2 x accum 1 and batch 1 x accum 2 see the same rows and average over the same tokens."""
    one = finetune(finetune_cfg(tiny_smol_dir, tmp_path / "a", max_steps=1, batch_size=2, lora_dropout=0.0), out=lambda s: None)
    two = finetune(finetune_cfg(tiny_smol_dir, tmp_path / "b", max_steps=1, batch_size=1, grad_accum=2, lora_dropout=0.0),
                      out=lambda s: None)  # fmt: skip
    assert one.history[0]["loss"] == pytest.approx(two.history[0]["loss"], rel=2e-2)
