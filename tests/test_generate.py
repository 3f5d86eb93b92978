"""`python -m qlora_engine.generate`: the NF4 base + adapter and its export answer alike, answers stop at
EOS, the chat loop keeps its history, and the command streams an answer."""

import io
import subprocess
import sys

import pytest

from qlora_engine import generate as gen
from qlora_engine.cli import main
from qlora_engine.lora.peft_format import load_with_adapter
from qlora_engine.models.hub import load_tokenizer
from qlora_engine.models.loader import load_plain

transformers = pytest.importorskip("transformers")
QUESTION = "What is the capital of Quenlar?"


@pytest.fixture(scope="module")
def run(smollm2_run):
    return smollm2_run[0]  # the session's one real run, shared with tests/export


@pytest.fixture(scope="module")
def models(run, smollm2_dir):
    tok = load_tokenizer(run / "merged")
    return load_with_adapter(smollm2_dir, run / "adapter"), load_plain(run / "merged"), tok


def test_adapter_and_export_give_the_same_greedy_answer_ending_at_eos(models):
    trained, exported, tok = models
    prompt_a, new_a = gen.generate_ids(trained, tok, QUESTION, max_new_tokens=48)
    prompt_b, new_b = gen.generate_ids(exported, tok, QUESTION, max_new_tokens=48)
    assert prompt_a.tolist() == prompt_b.tolist()
    print(f"\n[generate] adapter: {tok.decode(new_a)!r}\n[generate] export:  {tok.decode(new_b)!r}")
    assert new_a.tolist() == new_b.tolist()
    assert len(new_a) < 48 and int(new_a[-1]) in gen.eos_ids(trained, tok)  # stopped at EOS, not at the limit
    assert "Quenlar" in tok.decode(new_a, skip_special_tokens=True)


def test_streamed_pieces_make_the_answer(models):
    _, exported, tok = models
    pieces = []
    text = gen.generate_text(exported, tok, QUESTION, max_new_tokens=12, on_text=pieces.append)
    assert len(pieces) >= 2 and "".join(pieces).strip() == text


def test_chat_keeps_the_history_and_stops_at_an_empty_line(models, capsys):
    _, exported, tok = models
    history = gen.chat(exported, tok, max_new_tokens=6, temperature=0.0, stdin=io.StringIO(f"{QUESTION}\nAnd its currency?\n\nignored\n"))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And its currency?"
    # the second answer was generated after the whole first exchange
    second = gen.prompt_ids(tok, history[:3])[0]
    assert tok.decode(second).count("<|im_start|>user") == 2
    assert capsys.readouterr().out.count("\n") == 2


def test_cli_prompt_streams_an_answer(run):
    r = subprocess.run([sys.executable, "-m", "qlora_engine.generate", "--model", str(run / "merged"), "--prompt", QUESTION,
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.count("\n") == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter_config.json is missing" in err
