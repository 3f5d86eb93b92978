"""Shared fixtures: the real small model (converted once, cached outside git), tiny random
checkpoints (`models.synthetic`), a small training config, and one short real run on SmolLM2 with
its export, shared by the export and generate tests. Tests use these as fixtures; no test module
imports another."""

from __future__ import annotations

import io
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "qlora_engine" / "data"
QUESTION = "What is the capital of Quenlar?"

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


def _tiny(path, arch: str = "llama", seed: int = 0, dtype=torch.bfloat16, tokenizer=None, quant=None, **overrides):
    """A random-weight checkpoint directory of a tiny config of `arch` (weights N(0, 0.05): larger
    than the default so that 4-bit rounding shows in the logits)."""
    from qlora_engine.models.synthetic import random_checkpoint

    return random_checkpoint(path, {**TINY[arch], **overrides}, std=0.05, seed=seed, dtype=dtype, tokenizer=tokenizer,
                             quant=quant)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """make(path, arch="llama", seed=0, dtype=bf16, tokenizer=None, quant=None, **config overrides) -> path."""
    return _tiny


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint (converted once per machine)."""
    from qlora_engine.models import default_model

    return default_model.ensure()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def tiny_dir(tmp_path):
    return _tiny(tmp_path / "tiny-llama", "llama")


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
    path = tmp_path_factory.mktemp("tiny-smol") / "model"
    return _tiny(path, "llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                 pad_token_id=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 tokenizer=smollm2_dir)  # fmt: skip


@pytest.fixture(scope="session")
def finetune_cfg():
    """make(model_dir, out_dir, **keys) -> a small training RunConfig on the bundled demo data."""
    from qlora_engine.train import config

    def make(model_dir, out_dir, **kw):
        base = dict(model=str(model_dir), data="demo", output_dir=str(out_dir), max_steps=4, batch_size=1, seq_len=256,
                    lr=1e-3, lora_r=8, lora_alpha=16, eval_every=0, save_every=0, seed=0)  # fmt: skip
        return config.from_dict({**base, **kw})

    return make


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory, smollm2_dir) -> tuple[Path, str]:
    """(run dir, log): a short QLoRA run on SmolLM2 through `qlora finetune` with `export: true` (so
    the export, its report and the exported model's answer come from the run), once per session."""
    from qlora_engine.cli import main

    run = tmp_path_factory.mktemp("smollm2") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["finetune", "--model", str(smollm2_dir), "--data", str(DATA / "demo_train.jsonl"),
                   "--eval-data", str(DATA / "demo_eval.jsonl"), "--output-dir", str(run), "--max-steps", "6",
                   "--batch-size", "1", "--lr", "1e-3", "--lora-r", "8", "--export", "true",
                   "--sample-prompt", QUESTION, "--sample-max-new-tokens", "16"])  # fmt: skip
    assert rc == 0, buf.getvalue()
    return run, buf.getvalue()
