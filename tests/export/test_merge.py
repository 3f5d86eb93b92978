"""`python -m qlora_engine.export`: the merged checkpoint is NF4(base) + adapter exactly, loads in plain
transformers, matches the trained model; bad input leaves nothing behind."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_engine.cli import main
from qlora_engine.export import merge
from qlora_engine.export import report as fidelity
from qlora_engine.lora import add_lora, lora_layers, peft_format
from qlora_engine.models import loader, tensorfiles
from qlora_engine.models.structure import block_linear_names

transformers = pytest.importorskip("transformers")

QUESTION = "What is the capital of Quenlar?"
NF4_PROVENANCE = {"base": "nf4", "blocksize": 64, "quant_type": "nf4", "double_quant": True}


def tiny_adapter(base: Path, out: Path, targets="all-linear", provenance=NF4_PROVENANCE, seed=0) -> Path:
    """A random adapter (nonzero B, so merging changes the model) saved the way training saves it,
    with random held-out token ids (tiny checkpoints have no tokenizer)."""
    if provenance["base"] == "nf4":
        model = loader.load_model(base)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    add_lora(model, 4, 8.0, target_modules=targets, seed=seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    peft_format.save_adapter(model, out, str(base), extra=provenance)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(seed))
    (out / "heldout_ids.json").write_text(json.dumps({"tokenizer": None, "samples": ids.tolist()}))
    return out


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    return {n: tensorfiles.read_tensor(e) for n, e in tensorfiles.list_tensors(out).items()}


def run_main(argv, capsys):
    capsys.readouterr()  # drop what set-up printed (progress bars)
    rc = main(["export", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    return rc, err


# ----------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_export_loads_in_transformers_and_matches_the_trained_model(smollm2_run, smollm2_dir):
    run, log = smollm2_run
    merged = run / "merged"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert (merged / "tokenizer.json").exists() and (merged / "chat_template.jinja").exists()
    assert (merged / "generation_config.json").exists()

    # SmolLM2 ties lm_head to the input embeddings: still tied, and not stored twice
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in tensorfiles.list_tensors(merged)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    report = json.loads((merged / merge.REPORT).read_text())
    print("\n" + fidelity.format_report(report))
    rows = fidelity.report_rows(report)
    assert report["heldout"]["source"].startswith(str(run / "adapter" / "heldout_ids.json"))
    assert report["compute_dtype"] == "float32"  # differences of the weights, not of bf16 arithmetic
    assert rows["export"]["mean_kl"] < 1e-3 and rows["export"]["top1_agreement"] >= 0.99
    # merging into the original bf16 weights is a different model from the one trained
    assert rows["original"]["mean_kl"] > 10 * rows["export"]["mean_kl"]
    assert rows["original"]["mean_abs_logit_diff"] > 3 * rows["export"]["mean_abs_logit_diff"]
    # the export is closer to the trained model than that model run in bf16 is
    assert rows["export"]["mean_kl"] < rows["trained_bf16"]["mean_kl"]

    assert f"exported model: Q: {QUESTION}" in log
    answer = log.split(f"exported model: Q: {QUESTION}\n", 1)[1].splitlines()[0]
    assert answer.strip().startswith("A:") and len(answer.strip()) > 3


# ----------------------------------------------------------------------------------------- exactness


def test_export_is_dequantized_nf4_plus_update_rounded_once(tmp_path, tiny_checkpoint):
    # a float32 checkpoint: training cast it to bf16 before quantizing, so must the export
    base = tiny_checkpoint(tmp_path / "base", "llama", dtype=torch.float32)
    adapter = tiny_adapter(base, tmp_path / "adapter", targets=["q_proj", "v_proj", "down_proj"])
    merge.export_merged(base, adapter, tmp_path / "out", report=False, log=lambda s: None)
    got = export_tensors(tmp_path / "out")
    trained = peft_format.load_with_adapter(base, adapter)
    src = export_tensors(base)
    assert set(got) == set(src)  # untied llama: lm_head stays its own tensor
    adapted = lora_layers(trained)
    for name in block_linear_names(trained):
        layer = trained.get_submodule(name)
        if name in adapted:  # exact NF4 dequantization + scale·B·A in float32, one rounding
            want = (layer.base_layer.dequantize(torch.float32) + layer.delta_weight()).to(torch.bfloat16)
        else:  # quantized in training but not adapted: still the dequantized NF4 weight
            want = layer.dequantize(torch.bfloat16)
        assert torch.equal(got[f"{name}.weight"], want), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(got[name], src[name].to(torch.bfloat16))


def test_fidelity_report_and_fp16_shards_keep_tied_embeddings(tmp_path, capsys, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "qwen2")  # tied, with q/k/v biases
    adapter = tiny_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    rc, err = run_main(["--model", base, "--adapter", adapter, "--out", out, "--dtype", "fp16", "--max-shard-size", "30KB",
                        "--no-report"], capsys)  # fmt: skip
    assert rc == 0, err
    index = json.loads((out / tensorfiles.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16" and cfg["tie_word_embeddings"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float16 and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    emb = "model.embed_tokens.weight"  # cast bf16 -> fp16 in place: the same values as .to()
    assert torch.equal(export_tensors(out)[emb], export_tensors(base)[emb].to(torch.float16))

    samples = [torch.randint(0, 288, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    report = fidelity.fidelity_report(base, adapter, out, torch.float16, samples=samples)
    print("\n" + fidelity.format_report(report))
    assert [r["key"] for r in report["rows"]] == ["trained", "trained_bf16", "export", "original"]
    rows = fidelity.report_rows(report)
    trained, exported, original = rows["trained"], rows["export"], rows["original"]
    assert "mean_kl" not in trained
    assert exported["mean_kl"] < 1e-4 and exported["top1_agreement"] >= 0.95
    assert original["mean_kl"] > 10 * exported["mean_kl"]
    assert abs(exported["ppl"] - trained["ppl"]) / trained["ppl"] < 1e-2


def test_plain_lora_adapter_merges_onto_the_16bit_weights(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "mistral")
    adapter = tiny_adapter(base, tmp_path / "adapter", provenance={"base": "bf16"})
    info = merge.export_merged(base, adapter, tmp_path / "out", log=lambda s: None)
    got, src = export_tensors(tmp_path / "out"), export_tensors(base)
    cfg, weights = peft_format.read_adapter(adapter)
    for name, (A, B) in weights.items():
        want = (src[f"{name}.weight"].float() + cfg["lora_alpha"] / A.shape[0] * (B.float() @ A.float())).to(torch.bfloat16)
        assert torch.equal(got[f"{name}.weight"], want), name
    rows = fidelity.report_rows(info)
    assert "original" not in rows  # the export is the merge into the original weights here
    assert rows["export"]["mean_kl"] < 1e-4


def test_4bit_base_checkpoint_gives_the_same_export(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "phi3")  # fused qkv / gate_up projections
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "q4")]) == 0
    adapter = tiny_adapter(base, tmp_path / "adapter")
    merge.export_merged(base, adapter, tmp_path / "from16", report=False, log=lambda s: None)
    merge.export_merged(tmp_path / "q4", adapter, tmp_path / "from4", report=False, log=lambda s: None)
    a, b = export_tensors(tmp_path / "from16"), export_tensors(tmp_path / "from4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantization_config" not in json.loads((tmp_path / "from4" / "config.json").read_text())

    (adapter / peft_format.PROVENANCE).write_text(json.dumps({**NF4_PROVENANCE, "blocksize": 128}))
    with pytest.raises(ValueError, match="trained with"):
        merge.export_merged(tmp_path / "q4", adapter, tmp_path / "bad", report=False, log=lambda s: None)
    assert not (tmp_path / "bad").exists()


def test_quantize_writes_the_bnb_4bit_format_and_reports_its_loss(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "llama")
    adapter = tiny_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    info = merge.export_merged(base, adapter, out, quantize=True, log=lambda s: None)
    # streamed re-quantization == what `qlora_engine.quantize` writes for the export, byte for byte
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "q4")]) == 0
    mine, ref = export_tensors(out / merge.NF4_DIR), export_tensors(tmp_path / "q4")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    q_cfg = json.loads((out / merge.NF4_DIR / "config.json").read_text())["quantization_config"]
    assert q_cfg == json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    pytest.importorskip("bitsandbytes")
    _, li = transformers.AutoModelForCausalLM.from_pretrained(out / merge.NF4_DIR, output_loading_info=True, device_map="cpu")
    assert not li["missing_keys"] and not li["unexpected_keys"]
    rows = fidelity.report_rows(info)
    assert rows["nf4"]["mean_kl"] > 10 * rows["export"]["mean_kl"]  # a second rounding: what the 16-bit export avoids
    assert json.loads((out / merge.REPORT).read_text())["rows"] == info["rows"]


def test_adapted_tied_output_embedding_is_untied(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "qwen2")
    adapter = tiny_adapter(base, tmp_path / "adapter", targets=["q_proj", "lm_head"])
    notes = []
    info = merge.export_merged(base, adapter, tmp_path / "out", log=notes.append)
    assert any("no longer tied" in n for n in notes)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in tensorfiles.list_tensors(tmp_path / "out")
    assert fidelity.report_rows(info)["export"]["mean_kl"] < 1e-4


# ----------------------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint(tmp_path / "base", "llama")
    return base, tiny_adapter(base, tmp_path / "adapter")


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_adapter_for_another_base_names_the_layer(tmp_path, tiny, capsys, tiny_checkpoint):
    _, adapter = tiny
    other = tiny_checkpoint(tmp_path / "other", "llama", intermediate_size=128)
    rc, err = run_main(["--model", other, "--adapter", adapter, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "model.layers.0.mlp." in err and "different base" in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_missing_adapter_file(tmp_path, tiny, capsys):
    base, adapter = tiny
    (adapter / peft_format.ADAPTER_WEIGHTS).unlink()
    rc, err = run_main(["--model", base, "--adapter", adapter, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1 and peft_format.ADAPTER_WEIGHTS in err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_forced(tmp_path, tiny, capsys):
    base, adapter = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export: --force may replace it (never a foreign directory)
    (out / "keep.txt").write_text("mine")
    rc, err = run_main(["--model", base, "--adapter", adapter, "--out", out], capsys)
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    rc, err = run_main(["--model", base, "--adapter", adapter, "--out", out, "--force"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / merge.REPORT).exists() and no_leftovers(tmp_path)


def test_full_disk_part_way_leaves_nothing(tmp_path, tiny, capsys, monkeypatch):
    base, adapter = tiny
    real_write, calls = tensorfiles.ShardedWriter.write, []

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(tensorfiles.ShardedWriter, "write", write)
    rc, err = run_main(["--model", base, "--adapter", adapter, "--out", tmp_path / "out", "--max-shard-size", "20KB"], capsys)
    assert len(calls) == 5
    assert rc == 1 and err.count("\n") == 1 and "No space left on device" in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora_engine.export", "--model", str(tmp_path / "nope"), "--adapter",
                        str(tmp_path / "a"), "--out", str(tmp_path / "o")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()



def test_shared_prefixes_are_counted_once():
    samples = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5]), torch.tensor([1, 2, 3, 4]), torch.tensor([7, 2])]
    masks = [m.tolist() for m in fidelity.distinct_positions(samples)]
    assert masks == [[True] * 4, [False, False, True], [False] * 4, [True, True]]
