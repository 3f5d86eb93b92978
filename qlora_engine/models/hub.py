"""Where a model comes from: a local checkpoint directory, the bundled default model, or a Hugging
Face hub id (`org/name`, `org/name@revision`), and its config and tokenizer.

A hub id is resolved with `huggingface_hub.snapshot_download`, which downloads into (or, offline,
reads from) the standard hub cache. Only what the engine reads is fetched: configs, tokenizer files,
the chat template and safetensors weights. Pickled weights (`.bin`, `.pt`) can run code when
unpickled, so they are refused unless the caller allows them (`--allow-pickle`); even then they are
read with `torch.load(weights_only=True)`. Nothing here sets the hub's environment: HF_HUB_OFFLINE,
HF_HOME / HF_HUB_CACHE and HF_TOKEN mean what huggingface_hub documents. `trust_remote_code` is
never passed: a model whose code lives in its repository is refused by transformers with a clear
message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError
from . import default_model

# org/name[@revision]: the shape of a hub id (a local path that exists always wins)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?$")
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` has the shape of a hub id, else None."""
    m = HUB_ID.match(str(spec))
    return (m.group("repo"), m.group("rev")) if m else None


def snapshot(repo_id: str, revision: str | None, patterns: list[str], repo_type: str = "model") -> Path:
    """The local folder of a hub repo's files matching `patterns` (downloaded, or from the cache
    when offline); a one-line InputError saying why when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)  # fmt: skip

    what = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise InputError(f"{what} is a gated {repo_type} on the Hugging Face hub: accept its terms on the hub page and "
                         "set HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{what}: no such {repo_type} on the Hugging Face hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{what}: the {repo_type} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{what} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE is set, or "
                         "no network): download it where there is a network, or give a local directory") from None
    except (OSError, ValueError) as e:  # connection errors, HTTP errors, invalid repo ids
        raise InputError(f"{what}: could not get it from the Hugging Face hub ({str(e).splitlines()[0][:200]})") from None


def has_weights(d: Path, pickles: bool) -> bool:
    pats = ["*.safetensors"] + (PICKLE_PATTERNS if pickles else [])
    return any(any(d.glob(p)) for p in pats)


def resolve_model(spec: str | Path, allow_pickle: bool = False) -> Path:
    """A checkpoint directory for `spec`: an existing directory, the bundled default model's name, or
    a hub id (downloaded into the hub cache, or found there offline)."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        return p
    if default_model.is_default_name(str(spec)):
        return default_model.ensure()
    hub = parse_hub_id(str(spec))
    if hub is None:
        raise InputError(f"{spec}: no such checkpoint directory (nor a hub id like org/name[@revision], nor the default "
                         f"model {default_model.NAME}); point --model at a directory with config.json and "
                         "*.safetensors")  # fmt: skip
    repo, rev = hub
    d = snapshot(repo, rev, SAFE_PATTERNS)
    if has_weights(d, pickles=False):
        return d
    if not allow_pickle:
        raise InputError(f"{spec} has no safetensors weights (pickled .bin/.pt files at most), and unpickling can run "
                         "code: pass --allow-pickle to read them with torch.load(weights_only=True), or use a "
                         "safetensors copy of the model")  # fmt: skip
    d = snapshot(repo, rev, SAFE_PATTERNS + PICKLE_PATTERNS)
    if not has_weights(d, pickles=True):
        raise InputError(f"{spec}: the repository holds no weights (no *.safetensors, *.bin or *.pt)")
    return d


def load_config(model_dir: str | Path):
    """The transformers config of a checkpoint directory, with a one-line error when it is not one."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such checkpoint directory")
    path = model_dir / "config.json"
    if not path.exists():
        raise InputError(f"{model_dir}: no config.json here; point --model at a Hugging Face checkpoint directory")
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(f"{path} is not valid JSON{where}: restore it from the original checkpoint") from None
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{path}: this model's code lives in its repository (trust_remote_code), which qlora_engine "
                             "never runs; use an architecture transformers ships") from None  # fmt: skip
        raise InputError(f"{path}: transformers cannot read this config ({str(e).splitlines()[0][:200]})") from None


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(model: str | Path):
    """The tokenizer of a checkpoint (a directory or hub id), with a pad token (the EOS token when
    it has none)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model(model)
    if not has_tokenizer(model_dir):
        raise InputError(f"{model_dir} has no tokenizer files; copy tokenizer.json / tokenizer_config.json from the "
                         "original checkpoint")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
