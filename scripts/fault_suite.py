"""kill -9 a fine-tuning run at random points, resume it each time, and check that it ends bit for
bit where an uninterrupted run ends (adapter bytes and the loss of every step).

    python scripts/fault_suite.py                     # 5 kills, a tiny random model with SmolLM2's tokenizer
    python scripts/fault_suite.py --kills 20 --seed 3 --model DIR

Each kill lands at a random step: the script reads the run's progress lines and sends SIGKILL a
random fraction of a step after the chosen one began, so kills fall inside a step, inside the
checkpoint write that follows every second step, or (the first one, sometimes) during start-up.
After each kill the run is started again with --resume when a checkpoint exists (from scratch
otherwise). `tests/test_reliability.py` runs it in a short form.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def argv(model: Path, out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "qlora_engine", "finetune", "--model", str(model), "--data", "demo", "--output-dir",
            str(out), "--max-steps", str(steps), "--batch-size", "1", "--seq-len", "128", "--lr", "1e-3", "--lora-r", "4",
            "--lora-dropout", "0.1", "--save-every", "2", "--seed", "5"] + ["--resume"] * resume  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def has_checkpoint(out: Path) -> bool:
    d = out / "checkpoints"
    return d.is_dir() and any(p.name.startswith("step-") for p in d.iterdir())


def tiny_model(root: Path) -> Path:
    from qlora_engine.models import default_model
    from qlora_engine.models.synthetic import random_checkpoint

    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    return random_checkpoint(root / "model", config, std=0.05, tokenizer=default_model.ensure())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random one)")
    ap.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary directory)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fault-suite-"))
    model = a.model or tiny_model(work)
    ref, cut = work / "uninterrupted", work / "killed"
    t0 = time.monotonic()
    subprocess.run(argv(model, ref, a.steps, False), check=True, capture_output=True, env=ENV, cwd=ROOT)
    full = time.monotonic() - t0
    print(f"uninterrupted run: {a.steps} steps in {full:.1f} s")
    step_s = full / a.steps  # an upper bound: the uninterrupted time includes start-up
    targets = sorted(rng.sample(range(1, a.steps), min(a.kills, a.steps - 1)))
    if rng.random() < 0.25:
        targets[0] = 0  # during start-up
    for k, target in enumerate(targets):
        proc = subprocess.Popen(argv(model, cut, a.steps, has_checkpoint(cut)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip
        for line in proc.stderr:
            m = re.match(r"training: (\d+)/", line)
            if target == 0 or (m and int(m.group(1)) >= target):
                break
        time.sleep(rng.uniform(0, step_s))
        proc.kill()
        proc.wait()
        ckpts = sorted(p.name for p in (cut / "checkpoints").glob("step-*")) if (cut / "checkpoints").is_dir() else []
        temps = [p.name for p in cut.rglob(".*tmp-*")] if cut.exists() else []
        where = "during start-up" if target == 0 else f"in or after step {target}"
        print(f"kill {k + 1}: SIGKILL {where}; on disk: {ckpts or 'no checkpoint'}"
              + (f"; a half-written {temps[0]} (removed by the next run)" if temps else ""))
    if not (cut / "adapter").exists():
        r = subprocess.run(argv(model, cut, a.steps, has_checkpoint(cut)), capture_output=True, text=True, env=ENV, cwd=ROOT)
        if r.returncode:
            print(f"the final resume failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            return 1
    same_adapter = (ref / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (cut / "adapter" / "adapter_model.safetensors").read_bytes()
    same_losses = losses(ref) == losses(cut)
    ok = same_adapter and same_losses
    print(f"adapter bytes equal: {same_adapter}; loss of every step equal: {same_losses}; bit for bit: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
