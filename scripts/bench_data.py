"""Data preparation at scale: the engine's prepared-once, cached, memory-mapped data against TRL's
`SFTTrainer` preparation with packing, on the same synthetic chat files, in the same run.

    python scripts/bench_data.py                                        # 10k and 100k samples
    python scripts/bench_data.py --sizes 10000,100000,1000000 --write benchmarks/data-prep.md

For each size the script writes a synthetic chat JSON Lines file (seeded; about 100 tokens a
sample with SmolLM2's tokenizer and chat template, like a public SFT set) under --workdir, nothing
of which is committed. Then, each in a fresh process with an empty cache where it says "first":
  ours first   `data.prepare` (load, render, tokenize, mask, pack, write the cache)
  ours cached  `data.prepare` again (the cache, memory-mapped)
  ours epoch   the cached load, then every row of the epoch assembled once (what training reads)
  trl first    `datasets.load_dataset` + `SFTTrainer._prepare_dataset(packing=True)` (TRL's own preparation)
  trl cached   the same again (datasets' cache of TRL's map steps)
Wall times are of those calls alone (imports and the tokenizer load excluded). Peak RSS is the
process's high-water mark and that of its largest worker (datasets.map's num_proc workers), and
"data" is the high-water mark less the RSS before the call (Python, torch, the tokenizer).
Memory-mapped cache pages a process has read count in its RSS as file-backed pages, which the
kernel drops under pressure; the anonymous (private) part is given apart for the epoch pass.

TRL is a benchmark-only dependency (`pip install trl`). TRL trains on every token of a
conversation unless the chat template has generation tags (SmolLM2's has none), so it computes no
assistant mask, which the engine does; both pack to the same seq_len with their default strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from it an be this are which or have not but had one all "
         "were their they has been more can will when there who so if what about would up into time only other some "
         "river city capital mountain engine data model train value number people school water system history music "
         "language question answer small large early later north south east west first second third market trade "
         "because through between during before after without against within around among toward").split()  # fmt: skip


def _text(rng: random.Random, mean: int, hi: int) -> str:
    n = max(2, min(hi, int(rng.lognormvariate(0, 0.6) * mean)))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def sample(rng: random.Random) -> dict:
    """One chat sample: an optional system prompt, one turn (sometimes two or three)."""
    msgs = [{"role": "system", "content": _text(rng, 10, 30)}] if rng.random() < 0.1 else []
    for _ in range(1 if rng.random() < 0.85 else rng.randint(2, 3)):
        msgs.append({"role": "user", "content": _text(rng, 16, 80)})
        msgs.append({"role": "assistant", "content": _text(rng, 30, 200)})
    return {"messages": msgs}


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """Write `n` samples (the same ones for the same n and seed); kept when already there."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            f.write(json.dumps(sample(rng)) + "\n")
    os.replace(tmp, path)
    return path


# ---- the measured calls, each in its own process ---------------------------------------------


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _cpu() -> float:
    """CPU seconds of this process and its finished workers (less sensitive than wall time to other load)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(kind: str, data: str, workdir: str, seq_len: int, procs: int) -> dict:
    from transformers import AutoTokenizer

    from qlora_engine.models import default_model

    tok = AutoTokenizer.from_pretrained(default_model.ensure())
    before = _status()["VmRSS"]
    cpu0, load0 = _cpu(), os.getloadavg()[0]
    t0 = time.perf_counter()
    result: dict = {}
    if kind.startswith("ours"):
        from qlora_engine import RunConfig
        from qlora_engine.train import data as data_mod

        cfg = RunConfig.make(data=data, seq_len=seq_len, packing=True, data_num_proc=procs,
                             data_cache_dir=str(Path(workdir) / "cache"))  # fmt: skip
        p = data_mod.prepare(cfg, tok)
        result["seconds"] = time.perf_counter() - t0
        result["cpu"] = _cpu() - cpu0
        rows = p.train_rows
        result |= {"samples": len(p.train.samples), "tokens": p.train.tokens, "rows": len(rows),
                   "efficiency": rows.meta["efficiency"]}  # fmt: skip
        if kind == "ours-epoch":
            t1 = time.perf_counter()
            for i in range(len(rows)):
                rows[i]
            result["epoch_seconds"] = time.perf_counter() - t1
    else:
        import datasets
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=str(Path(workdir) / "trl-out"), max_length=seq_len, packing=True,
                         dataset_num_proc=procs, report_to=[], use_cpu=True, bf16=False)  # fmt: skip
        ds = datasets.load_dataset("json", data_files=data, split="train")
        # What SFTTrainer.__init__ runs on its train_dataset, with the state it reads from the trainer
        trainer = argparse.Namespace(_tokenizer=tok, chat_template=None, completion_only_loss=args.completion_only_loss)
        out = SFTTrainer._prepare_dataset(trainer, ds, tok, args, True, None, "train")
        result["seconds"] = time.perf_counter() - t0
        result["cpu"] = _cpu() - cpu0
        import numpy as np

        lengths = np.asarray(out.with_format("arrow")["input_ids"].combine_chunks().value_lengths())
        result |= {"rows": len(out), "tokens": int(lengths.sum()), "efficiency": float(lengths.sum() / (len(out) * seq_len))}
    st = _status()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result |= {"before": before, "peak": st["VmHWM"], "child_peak": kids, "anon": st["RssAnon"], "file": st["RssFile"],
               "load": (load0 + os.getloadavg()[0]) / 2}  # fmt: skip
    return result


def run_child(kind: str, data: Path, workdir: Path, a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "hf"), "QLORA_ENGINE_PROGRESS": "off",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", kind, str(data), str(workdir), str(a.seq_len), str(a.procs)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"{kind} on {data.name} failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(line[-1][7:]) | {"process_seconds": time.perf_counter() - t0}


def measure(n: int, a) -> dict:
    work = Path(a.workdir)
    data = generate(work / f"chat-{n}.jsonl", n)
    out = {"n": n, "bytes": data.stat().st_size}
    for kind in ("ours-first", "ours-cached", "ours-epoch", "trl-first", "trl-cached"):
        if kind.startswith("trl") and not a.trl:
            continue
        side = work / f"run-{n}-{kind.split('-')[0]}"
        if kind.endswith("first") and side.exists():
            shutil.rmtree(side)  # an empty cache: a first preparation
        side.mkdir(parents=True, exist_ok=True)
        out[kind] = run_child(kind, data, side, a)
        r = out[kind]
        print(f"  {n:>9,} {kind:<12} {r['seconds']:8.1f} s  peak {r['peak'] / 2**20:7.0f} MiB (data "
              f"{(r['peak'] - r['before']) / 2**20:6.0f} MiB), largest worker {r['child_peak'] / 2**20:6.0f} MiB",
              flush=True)  # fmt: skip
    return out


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def table(results: list[dict], a, machine: str, versions: str) -> str:
    cmd = " ".join(["python", "scripts/bench_data.py"] + sys.argv[1:])
    lines = ["# Data preparation at scale\n",
             f"`{cmd}` on {machine}; {versions}. seq_len {a.seq_len}, packing on, {a.procs} processes for both "
             "(`data_num_proc`, TRL's `dataset_num_proc`); each measurement in a fresh process, one after the other "
             "in one run. The machine is shared with other work: \"load\" is its 1-minute load average during the "
             "call (2 means both cores busy), and CPU seconds (the process and its workers) are less sensitive to "
             "that load than wall time.\n",
             "## First preparation (empty caches)\n",
             "| samples (tokens) | file | ours: wall | ours: CPU | ours: peak RSS (data) | ours: largest worker | "
             "TRL: wall | TRL: CPU | TRL: peak RSS (data) | TRL: largest worker | TRL / ours, wall | TRL / ours, CPU | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        o, t = r["ours-first"], r.get("trl-first")
        trl = (f"{t['seconds']:.1f} s | {t['cpu']:.0f} s | {mib(t['peak'])} ({mib(t['peak'] - t['before'])}) | "
               f"{mib(t['child_peak'])} | {t['seconds'] / o['seconds']:.2f}x | {t['cpu'] / o['cpu']:.2f}x" if t
               else "- | - | - | - | - | -")  # fmt: skip
        load = f"{o['load']:.1f}" + (f" / {t['load']:.1f}" if t else "")
        lines.append(f"| {r['n']:,} ({o['tokens']:,}) | {r['bytes'] / 2**20:,.0f} MiB | {o['seconds']:.1f} s | "
                     f"{o['cpu']:.0f} s | {mib(o['peak'])} ({mib(o['peak'] - o['before'])}) | {mib(o['child_peak'])} | "
                     f"{trl} | {load} |")  # fmt: skip
    lines += ["", "## From the cache, and what training reads\n",
              "| samples | ours: from cache | ours: peak RSS (data) | one epoch of rows | its peak RSS: private + file-backed "
              "at the end | packing efficiency | TRL: from its cache | TRL: peak RSS (data) | TRL packing efficiency |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        c, e, tc, t = r["ours-cached"], r["ours-epoch"], r.get("trl-cached"), r.get("trl-first")
        trl = (f"{tc['seconds']:.1f} s | {mib(tc['peak'])} ({mib(tc['peak'] - tc['before'])}) | {100 * t['efficiency']:.1f}%"
               if tc else "- | - | -")  # fmt: skip
        lines.append(f"| {r['n']:,} | {c['seconds']:.2f} s | {mib(c['peak'])} ({mib(c['peak'] - c['before'])}) | "
                     f"{e['epoch_seconds']:.1f} s ({e['rows']:,} rows) | {mib(e['peak'])}: {mib(e['anon'])} + "
                     f"{mib(e['file'])} | {100 * c['efficiency']:.1f}% | {trl} |")  # fmt: skip
    lines += ["", "Peak RSS is the process's high-water mark (VmHWM); \"data\" is it less the RSS before the call "
              "(Python, torch, transformers and the tokenizer). The largest worker is the biggest of datasets.map's "
              "processes, forked from the main one (the pages they share count in both). \"One epoch of rows\" reads "
              "every packed row once from the memory-mapped cache, as training does; the pages it has mapped are "
              "unmapped whenever they grow by 128 MiB (they stay in the page cache), so its RSS does not grow with "
              "the dataset. Packing efficiency: real tokens / (rows x seq_len)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated sample counts")
    p.add_argument("--workdir", default="/tmp/qlora-bench-data", help="generated data, caches (never committed)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--procs", type=int, default=2, help="processes for the preparation (both sides)")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL (not installed)")
    p.add_argument("--write", help="write the markdown table here")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, data, workdir, seq_len, procs = a.child
        print("RESULT " + json.dumps(child(kind, data, workdir, int(seq_len), int(procs))), flush=True)
        return 0
    from qlora_engine import machine

    import datasets
    import transformers

    versions = f"transformers {transformers.__version__}, datasets {datasets.__version__}"
    if a.trl:
        try:
            import trl

            versions += f", TRL {trl.__version__}"
        except ImportError:
            print("TRL is not installed (pip install trl): skipping it", file=sys.stderr)
            a.trl = False
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    results = [measure(int(n), a) for n in a.sizes.split(",")]
    text = table(results, a, machine.describe(), versions)
    print(text)
    if a.write:
        Path(a.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
