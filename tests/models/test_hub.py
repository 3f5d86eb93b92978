"""Hub ids, offline, against a pre-populated local hub cache (no network): models and datasets by
`org/name[@revision]`, pickled weights refused unless allowed, one-line errors, and a whole
`qlora finetune` run on a hub model and a hub dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_engine.errors import InputError
from qlora_engine.models import loader
from qlora_engine.models.hub import parse_hub_id, resolve_model
from qlora_engine.train.data import load_records

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_repo(cache: Path, repo_id: str, files: dict[str, Path | str], repo_type: str = "model") -> Path:
    """A repository in huggingface_hub's cache layout (refs/main -> snapshots/<commit>/...)."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy(src, snap / name)
        else:
            (snap / name).write_text(src)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_smol_dir):
    """A hub cache holding org/tiny (safetensors), org/pickled (.bin only) and the dataset org/facts."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {p.name: p for p in tiny_smol_dir.iterdir() if p.is_file()}
    put_repo(cache, "org/tiny", files)
    sd = {n: loader.read_tensor(e) for n, e in loader.list_tensors(tiny_smol_dir).items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    put_repo(cache, "org/pickled", {**{n: p for n, p in files.items() if n != "model.safetensors"},
                                    "pytorch_model.bin": tmp_path / "pytorch_model.bin"})  # fmt: skip
    rows = lambda a, b: "".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(a, b))  # noqa: E731
    put_repo(cache, "org/facts", {"data/train.jsonl": rows(0, 12), "data/test.jsonl": rows(12, 16)}, "dataset")
    return cache


def test_hub_id_shape():
    assert parse_hub_id("meta-llama/Llama-3.1-8B") == ("meta-llama/Llama-3.1-8B", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("/abs/path") is None and parse_hub_id("name") is None


def test_models_resolve_from_the_cache_by_id_and_revision(hub, tiny_smol_dir):
    d = resolve_model("org/tiny")
    assert (d / "model.safetensors").exists() and d.name == COMMIT
    assert resolve_model(f"org/tiny@{COMMIT}") == d
    m = loader.load_model("org/tiny", progress=False)
    ref = loader.load_model(tiny_smol_dir, progress=False)
    ids = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_pickles_are_refused_unless_allowed(hub):
    with pytest.raises(InputError, match="--allow-pickle"):
        resolve_model("org/pickled")
    d = resolve_model("org/pickled", allow_pickle=True)
    assert (d / "pytorch_model.bin").exists()
    with pytest.raises(InputError, match="--allow-pickle"):
        loader.load_model(d, progress=False)
    m = loader.load_model("org/pickled", progress=False, allow_pickle=True)
    assert m.qlora_source == str(d)


def test_missing_repos_say_why_in_one_line(hub):
    for spec, words in (("org/absent", "not in the local hub cache"), ("org/tiny@nobranch", "not in the local hub cache"),
                        ("not/a/path/at/all", "no such checkpoint directory")):  # fmt: skip
        with pytest.raises(InputError, match=words) as e:
            resolve_model(spec)
        assert "\n" not in str(e.value)


def test_datasets_by_hub_id_with_split(hub, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    train = load_records("org/facts", split="train")
    test = load_records("org/facts", split="test")
    assert (len(train), len(test)) == (12, 4) and train[0]["prompt"] == "Q0?"
    assert len(load_records("org/facts", split=None)) == 4  # eval data with no split named: validation, else test
    with pytest.raises(InputError, match="has the splits"):
        load_records("org/facts", split="nope")


def test_finetune_on_a_hub_model_and_a_hub_dataset(hub, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "ds-cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "qlora_engine", "finetune", "--model", "org/tiny", "--data", "org/facts",
                        "--eval-data", "org/facts", "--output-dir", str(out), "--max-steps", "2", "--seq-len", "64",
                        "--lora-r", "4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data: org/facts (prompt_completion): train 12 samples" in r.stdout and "eval 4 samples" in r.stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny"  # portable: the id, not this machine's cache path
