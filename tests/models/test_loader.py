"""Streaming loader: tiny random checkpoints of several architectures and the real SmolLM2."""

import json
import os
import textwrap

import pytest
import torch
from torch import nn

from qlora_engine.errors import InputError
from qlora_engine.machine import child_peak_rss
from qlora_engine.models import loader
from qlora_engine.models.structure import block_linear_names
from qlora_engine.quant.linear import NF4Linear

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def bnb_model(path, dq=True):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                          bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    m = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu")
    return m.train()  # bnb's CPU eval mode repacks weights; compare in train mode (no dropout in these models)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_engine_equals_transformers_bnb(tmp_path, arch, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / arch, arch)
    eng = loader.load_model(path, quant=loader.QuantSpec(double_quant=False)).train()
    ref = bnb_model(path, dq=False)
    names = block_linear_names(eng)
    assert names and all(isinstance(eng.get_submodule(n), NF4Linear) for n in names)
    assert set(names) == {n for n, m in ref.named_modules() if type(m).__name__ == "Linear4bit"}
    assert eng.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not isinstance(eng.get_output_embeddings(), NF4Linear)
    for n in names:
        assert torch.equal(eng.get_submodule(n).weight, ref.get_submodule(n).weight.data.view(-1, 1))
    ids = torch.randint(0, eng.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(eng(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_fused_projections_are_quantized(tmp_path, tiny_checkpoint):
    eng = loader.load_model(tiny_checkpoint(tmp_path / "phi3", "phi3"))
    names = block_linear_names(eng)
    assert any(n.endswith("qkv_proj") for n in names) and any(n.endswith("gate_up_proj") for n in names)


def test_biases_and_tied_embeddings(tmp_path, tiny_checkpoint):
    eng = loader.load_model(tiny_checkpoint(tmp_path / "qwen2", "qwen2"))
    q = eng.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q.bias is not None and q.bias.dtype == torch.bfloat16
    assert eng.lm_head.weight is eng.model.embed_tokens.weight


def test_loads_prequantized_checkpoint_without_requantizing(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "src", "llama")
    ref = bnb_model(path, dq=True)
    ref.save_pretrained(tmp_path / "q4")
    eng = loader.load_model(tmp_path / "q4").train()
    assert eng.qlora_quant["prequantized"]
    for n in block_linear_names(eng):
        r = ref.get_submodule(n).weight
        assert torch.equal(eng.get_submodule(n).weight, r.data.view(-1, 1))
        assert torch.equal(eng.get_submodule(n).absmax, r.quant_state.absmax)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(eng(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_sharded_checkpoint(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "one", "llama")
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = loader.load_model(path)
    b = loader.load_model(tmp_path / "sharded")
    for n in block_linear_names(a):
        assert torch.equal(a.get_submodule(n).weight, b.get_submodule(n).weight)


def test_bad_checkpoints_give_one_line_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(InputError, match="config.json"):
        loader.load_model(tmp_path)
    path = tiny_checkpoint(tmp_path / "t", "llama")
    (path / "model.safetensors").rename(path / "weights.bin")
    with pytest.raises(InputError, match="allow-pickle"):
        loader.load_model(path)
    path = tiny_checkpoint(tmp_path / "u", "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="lacks"):
        loader.load_model(path)


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, transformers
    from qlora_engine.models import hub, loader
    if sys.argv[2] == "skeleton":  # everything but the tensor data: imports, config, empty model
        loader.empty_model(hub.load_config(sys.argv[1]), torch.bfloat16)
    else:
        loader.load_model(sys.argv[1])
""")


def child_peak(path, mode):
    return child_peak_rss(PEAK_SCRIPT, [path, mode])


def test_peak_host_memory_stays_below_16bit_model(tmp_path, tiny_checkpoint):
    """A linear-heavy checkpoint: loading must not hold the 16-bit model in host memory."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read peak RSS")
    path = tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=512)  # fmt: skip
    bf16_bytes = (path / "model.safetensors").stat().st_size
    growth = child_peak(path, "load") - child_peak(path, "skeleton")
    packed = sum(m.weight.numel() for m in loader.load_model(path).modules() if isinstance(m, NF4Linear))
    print(f"\n[loader] bf16 checkpoint {bf16_bytes / 2**20:.0f} MiB, peak host memory for loading {growth / 2**20:.0f} MiB "
          f"(packed weights {packed / 2**20:.0f} MiB)")
    assert packed < growth < 0.5 * bf16_bytes


def test_smollm2_loads_with_every_block_linear_in_nf4(smollm2_dir):
    m = loader.load_model(smollm2_dir)
    names = block_linear_names(m)
    assert len(names) == 30 * 7
    assert all(isinstance(m.get_submodule(n), NF4Linear) for n in names)
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight is m.model.embed_tokens.weight
