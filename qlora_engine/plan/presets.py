"""The built-in model presets: the memory-relevant fields of each model's published config.json
(no weights), and forgiving lookup by name ("Llama-2-7b-hf", "meta-llama/Llama-3.1-8B",
"qwen2.5-7b-instruct"). Data only; `shapes` turns a preset into a ModelShape.
"""

from __future__ import annotations

import copy
import difflib
import re

from ..errors import InputError


class ShapeError(InputError):
    """A model the planner cannot read; the message says what is missing or what would work."""


_LLAMA = dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
_QWEN25 = dict(model_type="qwen2", hidden_act="silu", tie_word_embeddings=False, vocab_size=152064,
               max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False,
               sliding_window=None)  # fmt: skip
_GEMMA2 = dict(model_type="gemma2", hidden_activation="gelu_pytorch_tanh", vocab_size=256000,
               max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, tie_word_embeddings=True, rms_norm_eps=1e-6, attention_bias=False)


def _p(base: dict, **kw) -> dict:
    return {**base, **kw}


# The memory-relevant fields of each model's published config.json (Hugging Face hub, as released).
# Qwen2.5: the -Instruct configs (32k positions; the base configs list 131072, reachable with YaRN).
PRESETS: dict[str, dict] = {
    "llama-7b": _p(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "llama-13b": _p(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                    num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "llama-33b": _p(_LLAMA, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                    num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "llama-65b": _p(_LLAMA, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama-2-7b": _p(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": _p(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-70b": _p(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": _p(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3.1-8b": _p(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                     rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3-70b": _p(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3.1-70b": _p(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                     rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3.2-1b": _p(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-3b": _p(_LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       hidden_act="silu", tie_word_embeddings=False),
    "mistral-7b-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                            max_position_embeddings=32768, sliding_window=None, rope_theta=1000000.0, rms_norm_eps=1e-5,
                            hidden_act="silu", tie_word_embeddings=False),
    "qwen2.5-7b": _p(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4),
    "qwen2.5-14b": _p(_QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                      num_key_value_heads=8, rms_norm_eps=1e-5),
    "qwen2.5-32b": _p(_QWEN25, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                      num_key_value_heads=8, rms_norm_eps=1e-5),
    "qwen2.5-72b": _p(_QWEN25, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, rms_norm_eps=1e-5),
    "gemma-2-2b": _p(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-9b": _p(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-27b": _p(_GEMMA2, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                      num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "smollm2-135m": _p(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}  # fmt: skip
ALIASES = {"llama-30b": "llama-33b", "llama-1-7b": "llama-7b", "llama-1-13b": "llama-13b", "llama-1-33b": "llama-33b",
           "llama-1-65b": "llama-65b", "llama-3.3-70b": "llama-3.1-70b", "mistral-7b-v0.1": "mistral-7b",
           "smollm2-135m-instruct": "smollm2-135m"}  # fmt: skip


def normalize_name(name: str) -> str:
    n = name.strip().lower().split("/")[-1]
    n = re.sub(r"[\s_]+", "-", n)
    n = re.sub(r"-(hf|instruct|chat|it)$", "", n)
    for short, full in (("meta-llama-", "llama-"), ("llama2", "llama-2"), ("llama3", "llama-3"), ("gemma2", "gemma-2")):
        n = n.replace(short, full)
    return ALIASES.get(n, n)


def preset_config(name: str) -> dict:
    """The config dict of a preset, forgiving about case, org prefixes and -hf/-instruct suffixes."""
    key = normalize_name(name)
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    near = difflib.get_close_matches(key, list(PRESETS) + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; nearest: {', '.join(near)}" if near else f"; known: {', '.join(PRESETS)}"
    raise ShapeError(f"unknown model preset {name!r}{hint}")
