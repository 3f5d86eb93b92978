"""The fault suite: every bad input is one exact line on stderr with exit 2 (1 for a run that could
not go on) and changes no file; every fault leaves a run that resumes bit for bit, and no command
leaves half-written output. `scripts/fault_suite.py` runs the longer random-kill loop; one test here
runs it in a short form."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (symlinks as their target), with its sha256: what "no file changed" compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


# ---- inputs the cases start from -----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_smol_dir):
    """A tiny model with a real tokenizer, an adapter for it, a run with two checkpoints, a good data file."""
    from qlora_engine.lora import add_lora
    from qlora_engine.lora.peft_format import save_adapter
    from qlora_engine.models.loader import load_model

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_smol_dir, w / "model")
    model = load_model(w / "model", progress=False)
    add_lora(model, 4, 8.0, seed=0)
    save_adapter(model, w / "adapter", str(w / "model"), extra={"base": "nf4", "blocksize": 64, "quant_type": "nf4",
                                                                 "double_quant": True})  # fmt: skip
    (w / "good.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(8)))
    rc = main(["finetune", "--model", str(w / "model"), "--data", str(w / "good.jsonl"), "--output-dir", str(w / "run"),
               "--max-steps", "2", "--save-every", "1", "--seq-len", "64", "--lora-r", "4", "--eval-fraction", "0.25"])
    assert rc == 0
    return w


def _copy(w: Path, t: Path, *names: str) -> None:
    for n in names:
        (shutil.copytree if (w / n).is_dir() else shutil.copy)(w / n, t / n)


def _tensor_entry(model_dir: Path, name: str):
    from qlora_engine.models.tensorfiles import list_tensors

    return list_tensors(model_dir)[name]


def _poison(model_dir: Path, name: str = "model.layers.0.mlp.down_proj.weight") -> None:
    """One NaN in a weight, written in place."""
    e = _tensor_entry(model_dir, name)
    with open(e.file, "r+b") as f:
        f.seek(e.offset + 2 * 7)
        f.write(torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())


FT = ["finetune", "--seq-len", "64", "--lora-r", "4", "--max-steps", "1"]


def c_config_missing(w, t):
    return FT + ["--config", str(t / "run.yaml")], f"config file {t}/run.yaml does not exist"


def c_config_not_yaml(w, t):
    (t / "run.yaml").write_text("lora_r: [1,\n")
    return FT + ["--config", str(t / "run.yaml")], None


def c_config_not_a_mapping(w, t):
    (t / "run.yaml").write_text("- a\n- b\n")
    return FT + ["--config", str(t / "run.yaml")], f"{t}/run.yaml must hold key: value pairs at the top level"


def c_config_unknown_key(w, t):
    (t / "run.yaml").write_text("lora_rr: 8\n")
    return FT + ["--config", str(t / "run.yaml")], "unknown config key 'lora_rr'; did you mean lora_r, lora_dropout?"


def c_bad_value(w, t):
    return ["finetune", "--lora-r", "0"], "lora_r must be a positive whole number, got 0"


def c_unknown_flag(w, t):
    return ["finetune", "--lora_rr", "3"], "unknown flag --lora-rr; did you mean --lora-r? (see `qlora finetune --help`)"


def c_data_missing(w, t):
    return FT + ["--model", str(w / "model"), "--data", str(t / "none.jsonl")], (
        f"data {t}/none.jsonl does not exist: give a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk directory "
        "or a hub dataset id (org/name)")


def c_data_empty(w, t):
    (t / "empty.jsonl").write_text("")
    return FT + ["--model", str(w / "model"), "--data", str(t / "empty.jsonl")], (
        f"{t}/empty.jsonl holds no samples: give a data file with at least one sample")


def c_data_bad_line(w, t):
    good = json.dumps({"prompt": "a", "completion": " b"})
    (t / "bad.jsonl").write_text(f"{good}\n\n{good}\n{{\"prompt\": \"x\", \n{good}\n")
    return FT + ["--model", str(w / "model"), "--data", str(t / "bad.jsonl")], None


def c_data_not_object(w, t):
    (t / "list.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps(["a", "b"]) + "\n")
    return FT + ["--model", str(w / "model"), "--data", str(t / "list.jsonl")], (
        f"{t}/list.jsonl:2: a sample must be a JSON object of fields, got a list; fix or remove line 2, or set "
        "on_bad_sample: skip")


def c_data_unknown_columns(w, t):
    (t / "cols.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    return FT + ["--model", str(w / "model"), "--data", str(t / "cols.jsonl")], (
        "cannot tell the format from columns ['answer', 'question']: expected messages (chat), instruction+output (alpaca), "
        "prompt+completion, text, or input_ids (already tokenized)")


def c_data_no_assistant(w, t):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    (t / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ok, bad, ok)))
    return FT + ["--model", str(w / "model"), "--data", str(t / "chat.jsonl"), "--eval-data", str(t / "chat.jsonl")], (
        f"{t}/chat.jsonl:2: a chat sample has no assistant message to learn from; fix it or leave it out, or set "
        "on_bad_sample: skip")


def c_data_nothing_to_train(w, t):
    long_prompt = {"prompt": "tell me " * 60, "completion": " the answer"}  # the completion lies past seq_len 64
    (t / "long.jsonl").write_text("".join(json.dumps(long_prompt) + "\n" for i in range(4)))
    return FT + ["--model", str(w / "model"), "--data", str(t / "long.jsonl")], None


def c_model_missing(w, t):
    return FT + ["--model", str(t / "nope")], (
        f"{t}/nope: no such checkpoint directory (nor a hub id like org/name[@revision], nor the default model "
        "SmolLM2-135M-Instruct); point --model at a directory with config.json and *.safetensors")


def c_config_json_broken(w, t):
    _copy(w, t, "model")
    (t / "model" / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    return FT + ["--model", str(t / "model"), "--data", "demo"], None


def c_truncated_weights(w, t):
    _copy(w, t, "model")
    f = t / "model" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)
    return FT + ["--model", str(t / "model"), "--data", "demo"], None


def c_header_not_json(w, t):
    _copy(w, t, "model")
    f = t / "model" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(raw))
    return FT + ["--model", str(t / "model"), "--data", "demo"], (
        f"{t}/model/model.safetensors: the safetensors header is not valid JSON; the file is damaged, restore it from the "
        "original checkpoint")


def c_nan_weight_finetune(w, t):
    _copy(w, t, "model")
    _poison(t / "model")
    return FT + ["--model", str(t / "model"), "--data", "demo"], None


def c_resume_without_checkpoint(w, t):
    return FT + ["--model", str(w / "model"), "--output-dir", str(t / "run"), "--resume"], (
        f"resume asked for, but {t}/run/checkpoints holds no checkpoint")


def c_resume_other_rank(w, t):
    _copy(w, t, "run")
    argv = ["finetune", "--model", str(w / "model"), "--data", str(w / "good.jsonl"), "--output-dir", str(t / "run"),
            "--max-steps", "4", "--save-every", "1", "--seq-len", "64", "--lora-r", "8", "--eval-fraction", "0.25", "--resume"]
    return argv, ("--resume: this run's settings differ from the checkpoint's (lora_r: 4 -> 8): resume with the checkpoint's "
                  "settings, or start a new output_dir")


def c_checkpoints_without_resume(w, t):
    _copy(w, t, "run")
    return FT + ["--model", str(w / "model"), "--data", "demo", "--output-dir", str(t / "run")], (
        f"{t}/run already holds checkpoints: pass --resume to continue, or choose another output_dir")


def c_no_intact_checkpoint(w, t):
    _copy(w, t, "run")
    for ckpt in (t / "run" / "checkpoints").iterdir():
        (ckpt / "optimizer.pt").write_bytes(b"")
    argv = ["finetune", "--model", str(w / "model"), "--data", str(w / "good.jsonl"), "--output-dir", str(t / "run"),
            "--max-steps", "4", "--save-every", "1", "--seq-len", "64", "--lora-r", "4", "--eval-fraction", "0.25", "--resume"]
    return argv, None


def c_symlinked_output(w, t):
    (t / "elsewhere").mkdir()
    (t / "run").mkdir()
    (t / "run" / "adapter").symlink_to(t / "elsewhere")
    return FT + ["--model", str(w / "model"), "--data", "demo", "--output-dir", str(t / "run")], None


def c_cuda_missing(w, t):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    return FT + ["--model", str(w / "model"), "--device", "cuda"], (
        "--device cuda was asked for but CUDA is not available here; use --device cpu (or auto)")


def c_plan_unknown_gpu(w, t):
    return ["plan", "--model", "llama-2-7b", "--gpu", "rtx9090"], None


def c_plan_bad_size(w, t):
    return ["plan", "--model", "llama-2-7b", "--gpu-memory", "24 gigs"], (
        "cannot read size '24 gigs': write it like 24GiB, 5GB or 500MB")


def c_quantize_out_exists(w, t):
    (t / "q4").mkdir()
    (t / "q4" / "mine.txt").write_text("keep")
    return ["quantize", "--model", str(w / "model"), "--out", str(t / "q4")], (
        f"{t}/q4 already exists: choose another --out or pass --force to replace it")


def c_quantize_out_is_input(w, t):
    _copy(w, t, "model")
    return ["quantize", "--model", str(t / "model"), "--out", str(t / "model"), "--force"], (
        f"--out {t}/model would replace the model ({t}/model) it reads: choose another --out")


def c_quantize_force_on_foreign_dir(w, t):
    (t / "notes").mkdir()
    (t / "notes" / "thesis.txt").write_text("years of work")
    return ["quantize", "--model", str(w / "model"), "--out", str(t / "notes"), "--force"], (
        f"{t}/notes holds files that are not a checkpoint, export or adapter: refusing to replace it, even with --force; "
        "choose another --out")


def c_quantize_nan(w, t):
    _copy(w, t, "model")
    _poison(t / "model")
    return ["quantize", "--model", str(t / "model"), "--out", str(t / "q4")], None


def c_quantize_blocksize(w, t):
    return ["quantize", "--model", str(w / "model"), "--out", str(t / "q4"), "--blocksize", "48"], (
        "blocksize 48 is not supported: use one of (32, 64, 128, 256, 512, 1024, 2048, 4096)")


def c_export_adapter_missing(w, t):
    (t / "adapter").mkdir()
    return ["export", "--model", str(w / "model"), "--adapter", str(t / "adapter"), "--out", str(t / "out")], (
        f"{t}/adapter/adapter_config.json is missing: an adapter directory needs adapter_config.json and "
        "adapter_model.safetensors")


def c_export_other_base(w, t):
    from qlora_engine.models.synthetic import random_checkpoint

    cfg = json.loads((w / "model" / "config.json").read_text())
    random_checkpoint(t / "other", {**cfg, "intermediate_size": 64}, tokenizer=w / "model")
    return ["export", "--model", str(t / "other"), "--adapter", str(w / "adapter"), "--out", str(t / "out")], None


def c_export_foreign_tensor(w, t):
    from qlora_engine.models.tensorfiles import load_file, save_file

    _copy(w, t, "adapter")
    f = t / "adapter" / "adapter_model.safetensors"
    save_file(f, {**load_file(f), "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    return ["export", "--model", str(w / "model"), "--adapter", str(t / "adapter"), "--out", str(t / "out")], (
        f"{t}/adapter/adapter_model.safetensors: unexpected tensor base_model.model.lm_head.weight (not a lora_A/lora_B weight)")


def c_export_out_is_adapter(w, t):
    _copy(w, t, "adapter")
    return ["export", "--model", str(w / "model"), "--adapter", str(t / "adapter"), "--out", str(t / "adapter"), "--force"], (
        f"--out {t}/adapter would replace the adapter ({t}/adapter) it reads: choose another --out")


def c_export_bad_dtype(w, t):
    return ["export", "--adapter", str(w / "adapter"), "--out", str(t / "o"), "--dtype", "fp8"], (
        "argument --dtype: invalid choice: 'fp8' (choose from 'bf16', 'fp16') (see `qlora export --help`)")


def c_export_corrupt_adapter(w, t):
    _copy(w, t, "adapter")
    (t / "adapter" / "adapter_model.safetensors").write_bytes(b"abc")
    return ["export", "--model", str(w / "model"), "--adapter", str(t / "adapter"), "--out", str(t / "out")], (
        f"{t}/adapter/adapter_model.safetensors: not a safetensors file (shorter than 8 bytes); restore it from the "
        "original checkpoint")


def c_generate_bad_temperature(w, t):
    return ["generate", "--model", str(w / "model"), "--prompt", "hi", "--temperature", "-1"], (
        "--max-new-tokens must be at least 1 and --temperature at least 0")


def c_generate_no_model(w, t):
    return ["generate", "--prompt", "hi"], "give --model (and --adapter for a base plus adapter)"


def c_generate_pickle_only(w, t):
    _copy(w, t, "model")
    from qlora_engine.models.tensorfiles import load_file

    torch.save(load_file(t / "model" / "model.safetensors"), t / "model" / "pytorch_model.bin")
    (t / "model" / "model.safetensors").unlink()
    return ["generate", "--model", str(t / "model"), "--prompt", "hi"], (
        f"{t}/model: only pickled weights (pytorch_model.bin), and unpickling can run code: pass --allow-pickle to read "
        "them with torch.load(weights_only=True), or convert them to safetensors")


def c_unknown_command(w, t):
    return ["finetun"], "unknown command 'finetun'; did you mean finetune? (commands: finetune, plan, quantize, export, " \
        "generate, serve, ext; see `qlora --help`)"


CASES = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}
# The cases whose exact message holds a part this machine decides (a parser's wording): matched on a pattern.
PATTERNS = {
    "config_not_yaml": r"{t}/run.yaml is not valid YAML: .+",
    "data_bad_line": r"{t}/bad.jsonl:4: not valid JSON \(.+, column \d+\); fix or remove line 4, or set on_bad_sample: skip",
    "data_nothing_to_train": r"{t}/long.jsonl: none of its 4 training samples has a token to train on \(the "
                             r"first is sample 1\): an empty completion or assistant turn, or one past seq_len 64; check "
                             r"the columns and data_format, or set train_on_prompt: true",
    "config_json_broken": r"{t}/model/config.json is not valid JSON \(line 2\): restore it from the original checkpoint",
    "truncated_weights": r"{t}/model/model.safetensors is truncated: tensor \S+ ends at byte \d+ of a \d+-byte file; "
                         r"download or copy it again",
    "nan_weight_finetune": r"{t}/model/model.safetensors: tensor model.layers.0.mlp.down_proj.weight holds 1 NaN/Inf "
                           r"value\(s\) of \d+; the checkpoint is damaged, restore it from the original",
    "quantize_nan": r"{t}/model/model.safetensors: tensor model.layers.0.mlp.down_proj.weight holds 1 NaN/Inf value\(s\) "
                    r"of \d+; the checkpoint is damaged, restore it from the original",
    "no_intact_checkpoint": r"no intact checkpoint in {t}/run/checkpoints \(step-00000002: optimizer.pt has 0 bytes, the "
                            r"manifest says \d+; step-00000001: optimizer.pt has 0 bytes, the manifest says \d+\): start "
                            r"over in a new output_dir",
    "symlinked_output": r"{t}/run/adapter is a symlink to {t}/elsewhere, outside {t}/run: a run writes only inside its "
                        r"output_dir; remove the link or choose another output_dir",
    "plan_unknown_gpu": r"unknown GPU 'rtx9090': did you mean .+\? known: .+; or give --gpu-memory 24GiB",
    "export_other_base": r"{t}/adapter: adapter layer model.layers.0.mlp.\w+ has A \(.+\), B \(.+\) but this base layer "
                         r"needs \(.+\), \(.+\) \(trained on a different base\?\)".replace("{t}/adapter", "{w}/adapter"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_exact_line_and_changes_nothing(name, world, tmp_path, capsys, monkeypatch):
    import re

    argv, message = CASES[name](world, tmp_path)
    # a finished demo run where a command without --output-dir would write: bad input must leave it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    before_t, before_w = snapshot(tmp_path), snapshot(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (name, code, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    line = err[len("error: ") : -1]
    if message is not None:
        assert line == message
    else:
        pattern = PATTERNS[name].replace("{t}", re.escape(str(tmp_path))).replace("{w}", re.escape(str(world)))
        assert re.fullmatch(pattern, line), (pattern, line)
    assert snapshot(tmp_path) == before_t, "a file changed, appeared or went"
    assert snapshot(world) == before_w


def test_there_are_at_least_thirty_cases_across_every_command():
    assert len(CASES) >= 30
    commands = {CASES[n](Path("/w"), Path("/t"))[0][0] for n in ("bad_value", "plan_bad_size", "quantize_blocksize", "export_bad_dtype",
                                                     "generate_no_model")}  # fmt: skip
    assert commands == {"finetune", "plan", "quantize", "export", "generate"}


# ---- faults ---------------------------------------------------------------------------------------


def finetune_argv(model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_engine", "finetune", "--model", str(model), "--data", "demo", "--output-dir",
            str(out), "--max-steps", str(steps), "--batch-size", "1", "--seq-len", "128", "--lr", "1e-3", "--lora-r", "4",
            "--lora-dropout", "0.1", "--save-every", "2", "--seed", "5", *extra]  # fmt: skip


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def stopped_at(reference: Path, out: Path, step: int) -> None:
    """The 8-step run as if it had stopped right after saving `step`: the reference run (which
    kept every checkpoint) without what came later (newer checkpoints, the final adapter)."""
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 8-step run, every checkpoint kept: what every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(finetune_argv(world / "model", out, 8, "--keep-checkpoints", "10"), check=True, capture_output=True,
                   env=ENV, cwd=ROOT)  # fmt: skip
    return out


def test_random_kills_resume_bit_for_bit(world, tmp_path):
    """The short form of scripts/fault_suite.py: kill -9 at random points, resume, compare."""
    r = subprocess.run([sys.executable, "scripts/fault_suite.py", "--model", str(world / "model"), "--kills", "2",
                        "--steps", "8", "--workdir", str(tmp_path), "--seed", "1"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bit for bit: yes" in r.stdout


@pytest.mark.parametrize("part", ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "state.pt",
                                  "manifest.json"])  # fmt: skip
def test_a_truncated_file_in_any_part_of_a_checkpoint_falls_back(part, world, reference, tmp_path):
    out = tmp_path / "run"
    stopped_at(reference, out, 4)
    f = out / "checkpoints" / "step-00000004" / part
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    r = subprocess.run(finetune_argv(world / "model", out, 8, "--resume", "--keep-checkpoints", "10"), capture_output=True,
                       text=True, env=ENV, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "step-00000004 is damaged" in warning[0] and "resuming from step-00000002" in warning[0]
    assert adapter_bytes(out) == adapter_bytes(reference)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(world, reference, tmp_path):
    out = tmp_path / "run"
    stopped_at(reference, out, 2)
    kept = snapshot(out / "checkpoints")
    limit = (out / "checkpoints" / "step-00000002" / "optimizer.pt").stat().st_size // 2

    def small_disk():  # files may not grow past `limit` bytes: the next optimizer.pt cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(finetune_argv(world / "model", out, 8, "--resume"), capture_output=True, text=True, env=ENV,
                       cwd=ROOT, preexec_fn=small_disk)  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.splitlines()[-1]  # above it: the progress lines a log shows
    assert last.startswith("error: File too large writing ") and "files already written are intact" in last, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error: ") == 1
    assert snapshot(out / "checkpoints") == kept
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    r = subprocess.run(finetune_argv(world / "model", out, 8, "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0 and adapter_bytes(out) == adapter_bytes(reference)


def _killed_midway(argv: list[str], out: Path, seconds: float) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not any(out.parent.glob(f".{out.name}.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(seconds)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_an_interrupted_export_or_quantize_leaves_no_half_written_output(command, world, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    if command == "export":
        argv = [sys.executable, "-m", "qlora_engine", "export", "--model", str(world / "model"), "--adapter",
                str(world / "adapter"), "--out", str(out)]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "qlora_engine", "quantize", "--model", str(smollm2_dir), "--out", str(out)]
    _killed_midway(argv, out, 0.0)  # as soon as it has begun writing
    assert not out.exists(), "a killed command left its output"
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_dir() and not list(tmp_path.glob(".out.*")), "the next run removes what the killed one left"
