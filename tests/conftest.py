"""Shared fixtures: the real small model (converted once, cached outside git) and tiny random checkpoints."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

# Row lengths are multiples of 64 as in real models: bnb 0.50's native CPU dequantize mis-indexes
# absmax when a 64-block straddles two rows, so bnb cannot be the reference for such shapes.
TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                  tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, vocab_size=300, max_position_embeddings=256,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=288, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=320, max_position_embeddings=256,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}  # fmt: skip


def make_tiny_checkpoint(path, arch: str = "llama", seed: int = 0, dtype=torch.bfloat16, **overrides):
    """A random-weight checkpoint directory of a tiny config of `arch`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[arch])
    kw.update(overrides)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # larger-than-default weights so 4-bit rounding is visible in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint (converted once per machine)."""
    from qlora_engine import default_model

    return default_model.ensure()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def tiny_dir(tmp_path):
    return make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_smol_dir(smollm2_dir, tmp_path_factory):
    """A 2-layer random llama that uses SmolLM2's real tokenizer and chat template: the whole data
    pipeline runs as for the real model, at a fraction of the cost."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-smol") / "model"
    make_tiny_checkpoint(path, "llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, path / name)
    return path


def finetune_cfg(model_dir, out_dir, **kw):
    """A small training config on the bundled demo data."""
    from qlora_engine import config

    base = dict(model=str(model_dir), data="demo", output_dir=str(out_dir), max_steps=4, batch_size=1, seq_len=256,
                lr=1e-3, lora_r=8, lora_alpha=16, eval_every=0, save_every=0, seed=0)  # fmt: skip
    base.update(kw)
    return config.from_dict(base)
