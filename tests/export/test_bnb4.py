"""`python -m qlora_engine.quantize`: the bnb/transformers 4-bit checkpoint it writes."""

import json
import subprocess
import sys

import pytest
import torch
from qlora_engine.cli import main as cli_main
from qlora_engine.models import loader

transformers = pytest.importorskip("transformers")


def main(argv):
    return cli_main(["quantize", *argv])
pytest.importorskip("bitsandbytes")


def test_quantized_checkpoint_loads_in_transformers_with_same_logits(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint(tmp_path / "src", "qwen2")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "q4"
    assert main(["--model", str(src), "--out", str(out), "--max-shard-size", "30KB"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "chat_template.jinja" in files
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] and cfg["bnb_4bit_use_double_quant"]
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, device_map="cpu")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    eng = loader.load_model(src)
    ids = torch.randint(0, 288, (2, 20))
    with torch.no_grad():
        assert torch.equal(ref.train()(input_ids=ids).logits, eng.train()(input_ids=ids).logits)


def test_refuses_existing_output_and_keeps_it(tmp_path, capsys, tiny_checkpoint):
    src = tiny_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export: --force may replace it (never a foreign directory)
    (out / "keep.txt").write_text("mine")
    assert main(["--model", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["--model", str(src), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_bad_model_path_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora_engine.quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such checkpoint directory" in r.stderr


def test_smollm2_quantized_checkpoint_matches_engine(smollm2_dir, tmp_path):
    out = tmp_path / "smol-q4"
    assert main(["--model", str(smollm2_dir), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, device_map="cpu")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    eng = loader.load_model(smollm2_dir)
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(ref.train()(input_ids=ids).logits, eng.train()(input_ids=ids).logits)
