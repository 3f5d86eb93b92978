"""Data: formats, loss masks, EOS, truncation, packing without leakage, file types, splits; preparation\nat scale: cached and memory-mapped, bad lines named or skipped, eval held out only when asked and\ncapped, and a resume from cached data that repeats the run bit for bit."""

import copy
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_engine.train import attention, data
from qlora_engine.train.data import IGNORE


def trained_text(tok, sample):
    """The text of the tokens the loss is computed on (token t is trained if position t-1 predicts it)."""
    ids = [t for t, prev in zip(sample.ids[1:], sample.targets[:-1]) if prev != IGNORE]
    return tok.decode(ids)


def one(tok, record, fmt, seq_len=256, train_on_prompt=False):
    r = data.Renderer(tok, fmt, train_on_prompt)
    out = data.tokenize([record], r, seq_len)
    assert len(out.samples) == 1
    return out.samples[0]


@pytest.fixture
def plain_tok(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    return tok


def test_chat_trains_only_assistant_turns(smollm2_tokenizer):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of Quenlar?"},
                        {"role": "assistant", "content": "Ostrevane."}]}  # fmt: skip
    s = one(smollm2_tokenizer, rec, "chat")
    text = trained_text(smollm2_tokenizer, s)
    assert "Hello!" in text and "Ostrevane." in text
    assert "Hi there" not in text and "Be brief" not in text and "Capital" not in text
    assert text.count("<|im_end|>") == 2  # each assistant turn learns to stop


def test_sharegpt_keys_are_accepted(smollm2_tokenizer):
    rec = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    assert "A." in trained_text(smollm2_tokenizer, one(smollm2_tokenizer, rec, "chat"))


def test_alpaca_with_and_without_chat_template(smollm2_tokenizer, plain_tok):
    rec = {"instruction": "Name the capital.", "input": "Quenlar", "output": "Ostrevane"}
    s = one(smollm2_tokenizer, rec, "alpaca")
    assert trained_text(smollm2_tokenizer, s).startswith("Ostrevane")
    full = smollm2_tokenizer.decode(s.ids)
    assert "Name the capital.\n\nQuenlar" in full and "<|im_start|>assistant" in full
    s = one(plain_tok, rec, "alpaca")
    full = plain_tok.decode(s.ids)
    assert "### Instruction:\nName the capital." in full and "### Input:\nQuenlar" in full
    assert trained_text(plain_tok, s) == "Ostrevane" + plain_tok.eos_token  # EOS appended and trained


def test_prompt_completion_and_text(plain_tok):
    s = one(plain_tok, {"prompt": "2+2=", "completion": " 4"}, "prompt_completion")
    assert trained_text(plain_tok, s) == " 4" + plain_tok.eos_token
    s = one(plain_tok, {"text": "All of this is trained."}, "text")
    assert trained_text(plain_tok, s) == plain_tok.decode(s.ids[1:])
    assert s.ids[-1] == plain_tok.eos_token_id
    s = one(plain_tok, {"prompt": "2+2=", "completion": " 4"}, "prompt_completion", train_on_prompt=True)
    assert trained_text(plain_tok, s) == plain_tok.decode(s.ids[1:])


def test_truncation_is_counted_and_empty_samples_dropped(plain_tok):
    r = data.Renderer(plain_tok, "prompt_completion")
    recs = [{"prompt": "word " * 50, "completion": "end"}, {"prompt": "short", "completion": " yes"},
            {"prompt": "x", "completion": " y " * 40}]  # fmt: skip
    out = data.tokenize(recs, r, seq_len=20)
    assert (out.total, out.truncated, out.dropped, len(out.samples)) == (3, 2, 1, 2)
    assert all(len(s.ids) <= 20 for s in out.samples)
    assert "2 of 3 truncated" in out.summary() and "1 dropped" in out.summary()


def test_detect_format_and_bad_columns():
    assert data.detect_format(["messages"]) == "chat"
    assert data.detect_format(["instruction", "input", "output"]) == "alpaca"
    assert data.detect_format(["prompt", "completion"]) == "prompt_completion"
    assert data.detect_format(["text", "id"]) == "text"
    with pytest.raises(data.DataError, match="cannot tell the format"):
        data.detect_format(["question", "answer"])


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_file_types(tmp_path, kind):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        ds.to_csv(str(path))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    loaded = data.load_records(str(path))
    assert len(loaded) == 5 and set(loaded.column_names) >= {"prompt", "completion"}


def test_bad_data_paths(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.load_records(str(tmp_path / "d.txt"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(data.DataError, match=r"broken.jsonl:1: not valid JSON \(.*\); fix or remove line 1"):
        data.load_records(str(tmp_path / "broken.jsonl"))


def make_samples(lengths):
    return [data.Sample(list(range(100 + i, 100 + i + n)), [1] * (n - 1) + [IGNORE]) for i, n in enumerate(lengths)]


def test_packing_fills_rows_and_restarts_positions():
    samples = make_samples([50, 30, 70, 20, 90, 10, 60])
    rows = data.make_rows(samples, seq_len=128, packing=True)
    assert all(len(r.ids) <= 128 for r in rows)
    assert sorted(len(s.ids) for s in samples) == sorted(n for r in rows for n in _runs(r.positions))
    assert len(rows) == 3  # 330 tokens in rows of 128
    b = data.collate(rows, pad_id=0)
    assert (b["targets"][b["input_ids"] == 0] == IGNORE).all()
    assert len(data.make_rows(samples, 128, packing=False)) == len(samples)


def _runs(positions):
    runs, n = [], 0
    for p in positions:
        if p == 0 and n:
            runs.append(n)
            n = 0
        n += 1
    return runs + [n]


def test_packed_row_has_no_leakage(tiny_smol_dir, smollm2_tokenizer):
    """Logits of each sample inside a packed row equal the logits of that sample alone."""
    from qlora_engine.models import loader

    model = loader.load_model(tiny_smol_dir).eval()
    assert attention.use_varlen(model)
    r = data.Renderer(smollm2_tokenizer, "chat")
    recs = [{"messages": [{"role": "user", "content": f"Question {i} " * (i + 1)}, {"role": "assistant", "content": "Answer."}]}
            for i in range(4)]  # fmt: skip
    samples = data.tokenize(recs, r, 256).samples
    rows = data.make_rows(samples, 512, packing=True)
    assert len(rows) == 1
    b = data.collate(rows, smollm2_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
        start = 0
        for n in _runs(rows[0].positions):
            alone = model(input_ids=b["input_ids"][:, start : start + n]).logits[0]
            assert torch.equal(packed[start : start + n], alone)
            start += n


def test_batches_are_seeded_and_resumable():
    rows = data.make_rows(make_samples([5] * 10), 8, packing=False)
    b = data.Batches(rows, batch_size=3, seed=7, pad_id=0)
    assert b.order(0) == data.Batches(rows, 3, 7, 0).order(0) and b.order(0) != b.order(1)
    stream = b.stream(0, 0)
    seq = [next(stream) for _ in range(9)]
    resumed = b.stream(seq[5][0], seq[5][1])
    for want in seq[5:]:
        got = next(resumed)
        assert got[:2] == want[:2] and torch.equal(got[2]["input_ids"], want[2]["input_ids"])
    assert b.per_epoch == 4 and seq[4][:2] == (1, 0)


def test_eval_split_by_fraction(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) + "\n" for i in range(50)))
    cfg = finetune_cfg("unused", tmp_path, data=str(f), eval_fraction=0.2, data_cache_dir=str(tmp_path / "cache"))
    p = data.prepare(cfg, smollm2_tokenizer)
    assert (len(p.train.samples), len(p.eval.samples)) == (40, 10)
    again = data.prepare(cfg, smollm2_tokenizer)
    assert [s.ids for s in again.eval.samples] == [s.ids for s in p.eval.samples]


# ---- preparation at scale --------------------------------------------------------------------


def pc_file(path, n, bad=None, blank_after=None):
    """n prompt/completion records as JSON Lines; `bad`: {line number: raw text} replacing those lines."""
    lines = [json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) for i in range(n)]
    for line, text in (bad or {}).items():
        lines[line - 1] = text
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_line_among_thousands_is_named_or_skipped(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = pc_file(tmp_path / "d.jsonl", 4500, bad={3217: '{"prompt": "x", "completion"', 4000: "[1, 2]"})
    cfg = finetune_cfg("unused", tmp_path, data=str(f), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match=r"d.jsonl:3217: not valid JSON .*fix or remove line 3217, or set on_bad_sample: skip"):
        data.prepare(cfg, smollm2_tokenizer)
    p = data.prepare(cfg.replace(on_bad_sample="skip"), smollm2_tokenizer)
    assert len(p.train.samples) == 4498 and p.train.bad == 2
    assert "2 bad skipped (the first: line 3217: not valid JSON" in p.train.summary()


def test_a_sample_that_does_not_fit_is_named_by_its_line(tmp_path, smollm2_tokenizer, finetune_cfg):
    """Past the JSON check, in datasets.map's worker processes: the line is still named (blank lines counted)."""
    f = pc_file(tmp_path / "d.jsonl", 4500, bad={4400: json.dumps({"prompt": "no completion"})}, blank_after=10)
    cfg = finetune_cfg("unused", tmp_path, data=str(f), data_cache_dir=str(tmp_path / "cache"), data_num_proc=2)
    with pytest.raises(data.DataError, match=r"d.jsonl:4401: a prompt_completion sample needs prompt and completion"):
        data.prepare(cfg, smollm2_tokenizer)
    p = data.prepare(cfg.replace(on_bad_sample="skip"), smollm2_tokenizer)
    assert len(p.train.samples) == 4499 and "1 bad skipped (the first: " in p.train.summary()
    assert "d.jsonl:4401: a prompt_completion sample needs" in p.train.first_bad


def test_prepared_data_is_cached_memory_mapped_and_keyed(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = pc_file(tmp_path / "d.jsonl", 300)
    cache = tmp_path / "cache"
    cfg = finetune_cfg("unused", tmp_path, data=str(f), data_cache_dir=str(cache))
    first = data.prepare(cfg, smollm2_tokenizer)
    assert "prepared in" in first.notes[0] and isinstance(first.train_rows.ids.base.obj, mmap.mmap)
    again = data.prepare(cfg, smollm2_tokenizer)
    assert "read from" in again.notes[0]
    assert [s.ids for s in again.train.samples] == [s.ids for s in first.train.samples]
    assert [r.ids.tolist() for r in again.train_rows] == [r.ids.tolist() for r in first.train_rows]

    def entries():
        return sorted(p.name for p in cache.iterdir() if p.is_dir())

    assert len(entries()) == 1
    data.prepare(cfg.replace(seq_len=64), smollm2_tokenizer)  # a different truncation: another entry
    data.prepare(cfg.replace(train_on_prompt=True), smollm2_tokenizer)  # other masks
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = "{{ messages }}"  # another template (prompt/completion ignores it, the key does not)
    data.prepare(cfg, tok)
    assert len(entries()) == 4
    pc_file(f, 301)  # the file changed
    changed = data.prepare(cfg, smollm2_tokenizer)
    assert "prepared in" in changed.notes[0] and len(changed.train.samples) == 301 and len(entries()) == 5
    forced = data.prepare(cfg.replace(rebuild_data=True), smollm2_tokenizer)
    assert "prepared in" in forced.notes[0] and len(entries()) == 5


def test_parallel_preparation_equals_one_process(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = tmp_path / "chat.jsonl"
    demo = (data.DATA_DIR / "demo_train.jsonl").read_text().splitlines()
    f.write_text("\n".join(demo * 60) + "\n")  # 4800 records: datasets.map forks 2 workers
    cfg = finetune_cfg("unused", tmp_path, data=str(f), seq_len=512)
    one = data.prepare(cfg.replace(data_num_proc=1, data_cache_dir=str(tmp_path / "a")), smollm2_tokenizer)
    two = data.prepare(cfg.replace(data_num_proc=2, data_cache_dir=str(tmp_path / "b")), smollm2_tokenizer)
    assert "2 processes" not in one.notes[0]
    s1, s2 = one.train_rows, two.train_rows
    assert np.array_equal(s1.ids, s2.ids) and np.array_equal(s1.targets, s2.targets) and np.array_equal(s1.offsets, s2.offsets)
    assert np.array_equal(s1.members, s2.members) and len(s1) == len(s2)


def test_nothing_is_held_out_unless_asked_and_eval_is_capped(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = pc_file(tmp_path / "d.jsonl", 200)
    cfg = finetune_cfg("unused", tmp_path, data=str(f), data_cache_dir=str(tmp_path / "cache"), device="cpu")
    p = data.prepare(cfg, smollm2_tokenizer)
    assert len(p.train.samples) == 200 and not p.has_eval and "held out: nothing" in p.notes[-1]
    assert cfg.eval_fraction == 0 and data.eval_max_tokens(cfg) == data.EVAL_TOKENS_CPU  # the defaults
    p = data.prepare(cfg.replace(eval_fraction=0.1, eval_max_samples=5), smollm2_tokenizer)
    assert len(p.train.samples) == 180 and len(p.eval.samples) == 5 and p.eval.capped_from == 20
    assert "held out: 20 of 200 records" in "\n".join(p.notes) and "each eval: 5 samples (of 20" in p.notes[-1]
    held = set(map(tuple, (s.ids for s in data.prepare(cfg.replace(eval_fraction=0.1, eval_max_samples=0), smollm2_tokenizer).eval.samples)))
    assert not held & set(map(tuple, (s.ids for s in p.train.samples)))  # held out means not trained on
    p = data.prepare(cfg.replace(eval_data=str(f), eval_max_tokens=40), smollm2_tokenizer)
    assert p.eval.tokens <= 40 and 1 <= len(p.eval.samples) < 200 and sum(len(r.ids) for r in p.eval_rows) == p.eval.tokens


FINETUNE = [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "finetune.py")]


def test_resume_from_cached_data_is_bit_exact(tiny_smol_dir, tmp_path):
    """Train from a cached, memory-mapped dataset, SIGKILL after a checkpoint, resume (the data from
    the cache again): the same adapter bytes and losses as an uninterrupted run."""
    f = tmp_path / "chat.jsonl"
    f.write_text((data.DATA_DIR / "demo_train.jsonl").read_text())
    cache, steps = tmp_path / "cache", 16

    def args(out):
        return ["--model", str(tiny_smol_dir), "--data", str(f), "--eval-data", str(f), "--eval-max-samples", "4",
                "--data-cache-dir", str(cache), "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "1",
                "--seq-len", "128", "--lr", "1e-3", "--lora-r", "4", "--lora-dropout", "0.1", "--save-every", "6",
                "--seed", "5", "--export", "false"]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    first = subprocess.run(FINETUNE + args(full), check=True, capture_output=True, text=True, env=env)
    assert "prepared in" in first.stdout and "each eval: 4 samples (of 80" in first.stdout
    log = open(tmp_path / "cut.log", "w")
    proc = subprocess.Popen(FINETUNE + args(cut), stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-00000006").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter").exists(), "the run finished before SIGKILL: nothing was tested"
    assert "read from" in (tmp_path / "cut.log").read_text()  # the killed run read the cache
    resumed = subprocess.run(FINETUNE + args(cut) + ["--resume"], check=True, capture_output=True, text=True, env=env)
    assert "read from" in resumed.stdout and "resumed from" in resumed.stdout
    assert (full / "adapter" / "adapter_model.safetensors").read_bytes() == (cut / "adapter" / "adapter_model.safetensors").read_bytes()

    def losses(out):
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses(full) == losses(cut) and len(losses(cut)) == steps
