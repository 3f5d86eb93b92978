"""More than one process on the CPU (gloo), launched by torchrun: DDP and FSDP compute what one
process computes, FSDP keeps 1/N of the NF4 weights per process, both resume bit for bit, a killed
rank stops the others with one line, and SIGTERM to the launcher saves a checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora_engine.models.tensorfiles import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(model: Path, out: Path, batch: int, steps: int = 4, *extra: str) -> list[str]:
    return ["-m", "qlora_engine", "finetune", "--model", str(model), "--data", "demo", "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", str(batch), "--seq-len", "128", "--lora-r", "4",
            "--lora-dropout", "0", "--save-every", "2", "--keep-checkpoints", "5", "--dtype", "fp32", "--lora-dtype",
            "fp32", "--dist-timeout", "60", *extra]  # fmt: skip


def single(model, out, batch, *extra):
    return subprocess.run([sys.executable, *args(model, out, batch, 4, *extra)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)  # fmt: skip


def launch(n: int, model, out, batch, *extra, steps: int = 4, **popen):
    cmd = [TORCHRUN, "--nproc-per-node", str(n), "--master-port", str(free_port()), *args(model, out, batch, steps, *extra)]
    if popen:
        return subprocess.Popen(cmd, env=ENV, cwd=ROOT, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def rel_err(a_dir: Path, b_dir: Path) -> float:
    """||a - b|| / ||b|| over every adapter tensor (the element-wise maximum is not a fair measure:
    Adam turns gradients at the level of rounding noise into full-size steps of either sign)."""
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a_dir, b_dir))
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
    return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5


@pytest.fixture(scope="module")
def model(tiny_smol_dir):
    return tiny_smol_dir


@pytest.fixture(scope="module")
def singles(model, tmp_path_factory):
    """One process at batch 2 and 3: what 2 and 3 ranks at batch 1 must reproduce."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for b in (2, 3):
        r = single(model, root / f"b{b}", b)
        assert r.returncode == 0, r.stderr[-2000:]
        out[b] = (root / f"b{b}", r.stderr)
    return out


@pytest.mark.parametrize("strategy,n", [("ddp", 2), ("fsdp", 2), ("fsdp", 3)])
def test_n_ranks_compute_what_one_process_computes(strategy, n, model, singles, tmp_path):
    out = tmp_path / "run"
    r = launch(n, model, out, 1, "--strategy", strategy)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_dir, ref_log = singles[n]
    got, want = losses(out), losses(ref_dir)
    assert len(got) == len(want) == 4
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
    err = rel_err(out, ref_dir)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"\n[distributed] {strategy} x {n} vs one process at batch {n}: losses within {worst:.1e}, adapter {err:.1e}")
    assert err < 1e-5
    if strategy == "fsdp":
        local, total = (int(v.replace(",", "")) for v in re.search(r"holds ([\d,]+) of the ([\d,]+) bytes", r.stdout).group(1, 2))
        n_tensors = 2 * 14  # codes and scales of the 14 quantized linears
        assert abs(local - total / n) <= 2 * n_tensors, (local, total, n)  # 1/N, give or take a row per tensor


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_under_each_strategy_is_bit_exact(strategy, model, tmp_path):
    full = tmp_path / "full"
    r = launch(2, model, full, 1, "--strategy", strategy, "--lora-dropout", "0.1", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    r = launch(2, model, cut, 1, "--strategy", strategy, "--lora-dropout", "0.1", "--dtype", "bf16", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000002" in r.stdout
    a, b = (d / "adapter" / "adapter_model.safetensors" for d in (full, cut))
    assert a.read_bytes() == b.read_bytes()


def _wait_for(proc, path: Path, pattern: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        assert proc.poll() is None, path.read_text()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout} s")


def _workers(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(k) for k in kids)


def test_a_killed_rank_stops_the_others_with_one_line(model, tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = launch(2, model, tmp_path / "run", 1, steps=400, stdout=subprocess.DEVNULL, stderr=f)
        _wait_for(proc, err, r"training: \d+/400")
        os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(timeout=90)
    took = time.monotonic() - t0
    text = err.read_text()
    ours = [line for line in text.splitlines() if line.startswith("error: ")]
    print(f"\n[distributed] after SIGKILL of one rank the run ended in {took:.1f} s: {ours}")
    assert proc.returncode != 0 and took < 60
    assert len(ours) == 1 and "another process of this 2-process run stopped" in ours[0] and "--resume" in ours[0]


def test_sigterm_to_the_launcher_saves_a_checkpoint_and_resume_finishes(model, tmp_path):
    out, err, log = tmp_path / "run", tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(err, "w") as e, open(log, "w") as o:
        proc = launch(2, model, out, 1, "--save-every", "1000", steps=400, stdout=o, stderr=e)
        _wait_for(proc, err, r"training: \d+/400")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    said = log.read_text()
    assert "stopped by signal 15" in said, said[-2000:] + err.read_text()[-2000:]
    step = int(re.search(r"after step (\d+)", said).group(1))
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()
    r = launch(2, model, out, 1, "--save-every", "1000", "--resume", steps=step + 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_accelerate_launch_runs_the_same_job(model, singles, tmp_path):
    """On a CPU machine accelerate needs --multi_gpu to start several processes (it then runs
    torch.distributed's launcher); `--cpu --num_processes 2` would quietly start one."""
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args(model, out, 1)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "HF_HOME": str(tmp_path / "hf")}, cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "strategy: ddp over 2 processes" in r.stdout
    assert rel_err(out, singles[2][0]) < 1e-5
