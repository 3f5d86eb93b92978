"""Data: formats, loss masks, EOS, truncation, packing without leakage, file types, splits."""

import copy
import json

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
    cfg = finetune_cfg("unused", tmp_path, data=str(f), eval_fraction=0.2)
    p = data.prepare(cfg, smollm2_tokenizer)
    assert (len(p.train.samples), len(p.eval.samples)) == (40, 10)
    again = data.prepare(cfg, smollm2_tokenizer)
    assert [s.ids for s in again.eval.samples] == [s.ids for s in p.eval.samples]
