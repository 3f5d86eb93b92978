"""Streaming: a source read as a datasets stream, packed on the fly in bounded buffers; the same
micro-batches from a replayed position; bad lines named or counted; a short training run."""

import json

import pytest
import torch

from qlora_engine.run import finetune
from qlora_engine.train import data


def chat_file(path, n, bad=None):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Question {i} " * (1 + i % 7)},
                                      {"role": "assistant", "content": f"Answer {i}."}]}) for i in range(n)]  # fmt: skip
    for line, text in (bad or {}).items():
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_cfg(finetune_cfg, tmp_path, f, **kw):
    return finetune_cfg("unused", tmp_path, data=str(f), streaming=True, stream_buffer=16, batch_size=2, **kw)


def test_a_replayed_position_gives_the_same_batches(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = chat_file(tmp_path / "d.jsonl", 100)
    p = data.prepare(stream_cfg(finetune_cfg, tmp_path, f), smollm2_tokenizer)
    assert p.train_rows is None and "streaming:" in p.notes[0] and not p.has_eval
    batches = p.batches(2, 0, smollm2_tokenizer.pad_token_id)
    it = batches.stream(0, 0)
    seq = [next(it) for _ in range(30)]
    epoch_end = next(i for i, (e, _, _) in enumerate(seq) if e == 1)  # 100 short samples: a few rows per buffer
    assert seq[epoch_end][1] == 0 and seq[epoch_end - 1][0] == 0
    for start in (3, epoch_end - 1, epoch_end + 1):
        again = p.batches(2, 0, smollm2_tokenizer.pad_token_id).stream(*seq[start][:2])
        for want in seq[start:]:
            got = next(again)
            assert got[:2] == want[:2] and all(torch.equal(got[2][k], want[2][k]) for k in want[2])
    b = seq[0][2]
    assert b["input_ids"].shape[1] <= 256 and (b["targets"] != data.IGNORE).any()
    # every sample trained once per epoch: the epoch's targets are those of the whole file, prepared in memory
    whole = data.tokenize([json.loads(l) for l in f.read_text().splitlines()], p.renderer, 256)
    assert sum(int((x["targets"] != data.IGNORE).sum()) for e, _, x in seq[:epoch_end]) == whole.trainable_tokens


def test_bad_lines_in_a_stream(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = chat_file(tmp_path / "d.jsonl", 100, bad={90: "{oops"})  # past the records read up front
    p = data.prepare(stream_cfg(finetune_cfg, tmp_path, f), smollm2_tokenizer)
    with pytest.raises(data.DataError, match=r"d.jsonl:90: not valid JSON"):
        list(zip(range(100), p.batches(2, 0, 0).stream(0, 0)))
    lines = []
    p = data.prepare(stream_cfg(finetune_cfg, tmp_path, f, on_bad_sample="skip"), smollm2_tokenizer, out=lines.append)
    b = p.batches(2, 0, 0)
    b.out = lines.append
    for epoch, _, _ in b.stream(0, 0):
        if epoch == 1:
            break
    assert any("stream: epoch 0 read: 99 records, 0 truncated, 0 dropped, 1 bad skipped" in l for l in lines), lines
    assert sum("skipped a bad sample (" in l and "d.jsonl:90" in l for l in lines) == 1


def test_streaming_settings_that_cannot_work_are_refused(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = chat_file(tmp_path / "d.jsonl", 10)
    with pytest.raises(data.DataError, match="needs max_steps"):
        data.prepare(stream_cfg(finetune_cfg, tmp_path, f, max_steps=0), smollm2_tokenizer)
    with pytest.raises(data.DataError, match="give eval_data"):
        data.prepare(stream_cfg(finetune_cfg, tmp_path, f, eval_fraction=0.1), smollm2_tokenizer)


def test_eval_data_is_read_from_its_stream_up_to_the_caps(tmp_path, smollm2_tokenizer, finetune_cfg):
    f = chat_file(tmp_path / "d.jsonl", 50)
    p = data.prepare(stream_cfg(finetune_cfg, tmp_path, f, eval_data=str(f), eval_max_samples=7), smollm2_tokenizer)
    assert len(p.eval.samples) == 7 and p.has_eval and "each eval: 7 samples" in p.notes[-1]


def test_training_on_a_stream(tiny_smol_dir, tmp_path, finetune_cfg):
    f = chat_file(tmp_path / "d.jsonl", 40)
    lines = []
    cfg = finetune_cfg(tiny_smol_dir, tmp_path / "run", data=str(f), streaming=True, stream_buffer=8, max_steps=6,
                       eval_data=str(f), eval_max_samples=4)  # fmt: skip
    r = finetune(cfg, out=lines.append)
    assert r.steps == 6 and r.eval_after is not None and (r.adapter_dir / "adapter_model.safetensors").exists()
    assert any("rows packed from the stream" in l for l in lines)
