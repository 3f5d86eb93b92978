"""QLoRA (NF4 base) vs LoRA on the bf16 base: same data, hyperparameters and seed; eval loss of both.

    python scripts/compare_qlora_bf16.py                      # demo facts task, SmolLM2-135M-Instruct
    python scripts/compare_qlora_bf16.py --task licenses      # language modelling on licence texts
    python scripts/compare_qlora_bf16.py --write benchmarks/qlora-vs-bf16.md

The QLoRA paper's claim, at small scale: fine-tuning on the 4-bit base reaches the same quality as
16-bit LoRA. Tasks:
- demo: the bundled Quenlar facts; eval on held-out phrasings of the same facts;
- licenses: raw text from /usr/share/common-licenses (GPL-3 held out for eval, the others train),
  cut into chunks; a task where the loss stays well above zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def license_data(tmp: Path) -> tuple[Path, Path]:
    """Train on every licence but GPL-3 (and its duplicates), eval on GPL-3; ~1500-character chunks."""

    def chunks(text: str, size: int = 1500):
        paras, cur = text.split("\n\n"), ""
        for p in paras:
            if len(cur) + len(p) > size and cur:
                yield cur.strip()
                cur = ""
            cur += p + "\n\n"
        if cur.strip():
            yield cur.strip()

    skip = {"GPL-3", "GPL", "LGPL", "LGPL-3", "GFDL"}  # GPL is a link to GPL-3; LGPL to LGPL-3; GFDL to GFDL-1.3
    train = [c for p in sorted(LICENSES.iterdir()) if p.name not in skip and p.is_file() for c in chunks(p.read_text(errors="replace"))]
    evals = list(chunks((LICENSES / "GPL-3").read_text()))
    out = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        f = tmp / name
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        out.append(f)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("demo", "licenses"), default="demo")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--write", default=None, help="also write the result as markdown here")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from qlora_engine import RunConfig, finetune, machine

    tmp = Path(tempfile.mkdtemp(prefix="qlora-vs-bf16-"))
    if a.task == "demo":
        task = {"data": "demo", "max_steps": a.steps or 40, "lr": a.lr or 1e-3, "batch_size": 2, "eval_every": 10}
    else:
        train_f, eval_f = license_data(tmp)
        task = {"data": str(train_f), "eval_data": str(eval_f), "data_format": "text", "max_steps": a.steps or 60,
                "lr": a.lr or 2e-4, "batch_size": 2, "eval_every": 10}  # fmt: skip
    runs = {}
    for base in ("nf4", "bf16"):
        cfg = RunConfig.make(**{"model": a.model, "base": base, "output_dir": str(tmp / base), "seq_len": 512, "lora_r": a.rank,
                                "lora_alpha": 2 * a.rank, "lora_dropout": 0.05, "seed": a.seed, "warmup": 0.1, **task})  # fmt: skip
        print(f"--- {base} base ---", file=sys.stderr, flush=True)
        r = finetune(cfg, out=lambda s: print(s, file=sys.stderr, flush=True))
        curve = [json.loads(l) for l in (tmp / base / "metrics.jsonl").read_text().splitlines()]
        runs[base] = {"before": r.eval_before["eval_loss"], "after": r.eval_after["eval_loss"],
                      "curve": {c["step"]: c["eval_loss"] for c in curve if "eval_loss" in c}}  # fmt: skip
    nf, bf = runs["nf4"], runs["bf16"]
    gap = (nf["after"] - bf["after"]) / bf["after"]
    cpu = machine.describe("cpu")
    lines = [f"QLoRA (NF4+DQ base) vs LoRA (bf16 base), {a.model}, task {a.task}: {json.dumps(task)}",
             f"LoRA r={a.rank} alpha={2 * a.rank} dropout=0.05 on all linear layers, seq 512, seed {a.seed}; machine: {cpu}; torch {torch.__version__}",
             f"command: `python {' '.join(sys.argv)}`", "",
             "| step | eval loss, NF4 base | eval loss, bf16 base | gap |", "|---|---|---|---|"]  # fmt: skip
    for step in sorted(nf["curve"]):
        x, y = nf["curve"][step], bf["curve"].get(step)
        lines.append(f"| {step} | {x:.4f} | {y:.4f} | {100 * (x - y) / y:+.2f}% |" if y else f"| {step} | {x:.4f} | - | - |")
    lines += ["", f"final eval loss: NF4 {nf['after']:.4f} vs bf16 {bf['after']:.4f}: gap {100 * gap:+.2f}% "
              f"({'within' if abs(gap) <= 0.02 else 'OUTSIDE'} 2%)"]  # fmt: skip
    print("\n".join(lines))
    if a.write:
        from qlora_engine.models.tensorfiles import write_text_atomic

        write_text_atomic(a.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
