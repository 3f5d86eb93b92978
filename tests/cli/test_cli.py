"""The `qlora` command: one entry point for every command, the old `python -m` and script entry
points, one-line errors (`--debug` for the traceback), progress lines when not on a terminal, the
demo's start-over / resume, and `ext --check` on a machine without a GPU."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_engine.cli import COMMANDS, main
from qlora_engine.cli.finetune import demo_start
from qlora_engine.train import config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*argv, **kw):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, **kw)


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert main(["finetun"]) == 2
    assert "did you mean finetune?" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_has_help_with_dashed_flags(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--debug" in out
    flags = [w for w in out.split() if w.startswith("--")]
    assert flags and not any("_" in f.split("=")[0] for f in flags), [f for f in flags if "_" in f]
    if cmd in ("plan", "finetune"):
        assert "--seq-len" in out and "--lora-r" in out  # plan --help lists the run keys too
    device = {o: a for a in importlib.import_module(f"qlora_engine.cli.{cmd}").build_parser()._actions
              for o in a.option_strings}.get("--device")  # fmt: skip
    if device is not None:  # --device defaults to auto everywhere (run keys: through the config's default)
        assert device.default == "auto" or config.all_fields()["device"][1].default == "auto"


def test_console_script_module_and_old_entry_points_agree():
    qlora = Path(sys.executable).with_name("qlora")
    assert qlora.exists(), "pip install -e . installs the qlora console script"
    outs = [run("-m", "qlora_engine", "plan", "--model", "smollm2-135m", "--gpu", "4090").stdout,
            run("-m", "qlora_engine.plan", "--model", "smollm2-135m", "--gpu", "4090").stdout,
            subprocess.run([str(qlora), "plan", "--model", "smollm2-135m", "--gpu", "4090"], capture_output=True,
                           text=True, env=ENV).stdout]  # fmt: skip
    assert outs[0] and outs[0] == outs[1] == outs[2]
    assert "usage: qlora finetune" in run("scripts/finetune.py", "--help").stdout


def test_ext_check_without_a_gpu_is_a_skip():
    r = run("-m", "qlora_engine.ext", "--check")
    if "check:     skipped" not in r.stdout:
        pytest.skip("a CUDA device and the library are here: the check ran")
    assert r.returncode == 0


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = ["-m", "qlora_engine", "quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    r = run(*argv)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    d = run(*argv, "--debug")
    assert d.returncode == 2 and "Traceback" in d.stderr
    assert not (tmp_path / "o").exists()


def test_progress_is_plain_lines_in_a_log(tiny_smol_dir, tmp_path):
    r = run("-m", "qlora_engine", "finetune", "--model", str(tiny_smol_dir), "--data", "demo", "--output-dir",
            str(tmp_path / "run"), "--max-steps", "3", "--seq-len", "128", "--lora-r", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "\r" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("training: ")]
    assert len(lines) == 3 and "3/3 step" in lines[-1]
    for word in ("loss", "tok_s", "mem", "elapsed"):
        assert word in lines[0]
    assert "ETA" in lines[0] and any(line.startswith("loading ") for line in r.stderr.splitlines())


def test_demo_resumes_an_interrupted_run_and_starts_a_finished_one_over(tmp_path):
    cfg = config.from_dict({"output_dir": str(tmp_path / "demo"), "max_steps": 40})
    said = []
    assert demo_start(cfg, said.append) is cfg and "fine-tuning into" in said[-1]
    ckpt = tmp_path / "demo" / "checkpoints" / "step-00000020"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    (tmp_path / "demo" / "metrics.jsonl").write_text("{}\n")
    resumed = demo_start(cfg, said.append)
    assert resumed.resume and "resuming the interrupted demo run" in said[-1] and "step-00000020" in said[-1]
    (tmp_path / "demo" / "adapter").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    again = demo_start(cfg, said.append)
    assert not again.resume and "starting over" in said[-1]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["notes.txt"]  # only what a run writes went
