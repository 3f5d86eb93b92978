"""The adapter registry in-process, on a tiny random model: what it refuses, in one line (an adapter
trained on another kind of base, one that adapts an embedding, NaN weights, a bad or taken name),
and an adapter removed while a request uses it keeps its slot until that request ends. A bf16 base
(`--base bf16`) serves exactly what `load_with_adapter` builds for an adapter trained on one. CPU, ~3 s."""

import json

import pytest
import torch

from qlora_engine.errors import InputError
from qlora_engine.generate import generate_ids, prompt_ids
from qlora_engine.lora.peft_format import load_with_adapter
from qlora_engine.models.hub import load_tokenizer
from qlora_engine.models.loader import BASE_DTYPE, QuantSpec, load_dense, load_model
from qlora_engine.serve.adapters import AdapterRegistry, NameTaken, UnknownModel
from qlora_engine.serve.engine import Engine, Sequence
from qlora_engine.serve.multi_lora import MultiLoraLinear
from qlora_engine.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def nf4_registry(tiny_smol_dir):
    model = load_model(tiny_smol_dir, progress=False).eval()
    return AdapterRegistry(model, "base", "nf4", QuantSpec(), BASE_DTYPE)


def test_refused_adapters_get_one_line_and_change_nothing(nf4_registry, tiny_smol_dir, tmp_path, random_adapter):
    reg = nf4_registry
    bf16 = random_adapter(tiny_smol_dir, tmp_path / "bf16", extra={"base": "bf16"})
    emb = random_adapter(tiny_smol_dir, tmp_path / "emb", targets=["embed_tokens", "q_proj"])
    nan = random_adapter(tiny_smol_dir, tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    weights = load_file(nan / "adapter_model.safetensors")
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, nan / "adapter_model.safetensors")
    for name, path, words in [("a", bf16, "--base bf16"), ("b", emb, "linear layers only"), ("c", nan, "NaN"),
                              ("bad name!", bf16, "not allowed"), ("base", bf16, "already in use")]:  # fmt: skip
        with pytest.raises(InputError, match=words) as e:
            reg.prepare(name, path)
        assert "\n" not in str(e.value)
    assert reg.names() == [] and not any(isinstance(m, MultiLoraLinear) for m in reg.model.modules())
    with pytest.raises(UnknownModel):
        reg.acquire("nope")


def test_a_removed_adapter_keeps_its_slot_until_its_last_request_ends(nf4_registry, tiny_smol_dir, tmp_path, random_adapter):
    reg = nf4_registry
    d = random_adapter(tiny_smol_dir, tmp_path / "x")
    a = reg.install(reg.prepare("x", d))
    with pytest.raises(NameTaken):
        reg.prepare("x", d)
    layer = reg.model.get_submodule(a.layer_names[0])
    used = reg.acquire("x")
    reg.remove("x")
    assert reg.names() == [] and a.slot in layer.banks[8].index  # gone by name, still in the layers
    reg.release(used)
    assert 8 not in layer.banks  # freed with its last user
    b = reg.install(reg.prepare("y", d))
    assert b.slot == a.slot  # the slot is reused
    reg.remove("y")


def test_a_bf16_base_serves_what_load_with_adapter_builds(tiny_smol_dir, tmp_path, random_adapter):
    tok = load_tokenizer(tiny_smol_dir)
    d = random_adapter(tiny_smol_dir, tmp_path / "plain", seed=3, model=load_dense(tiny_smol_dir), extra={"base": "bf16"})
    prompts = ["Tell me a story", "What is the capital of Quenlar? " * 3]
    want = [generate_ids(load_with_adapter(tiny_smol_dir, d), tok, p, max_new_tokens=16)[1].tolist() for p in prompts]
    model = load_dense(tiny_smol_dir).eval()
    reg = AdapterRegistry(model, "base", "bf16", QuantSpec(), BASE_DTYPE)
    reg.install(reg.prepare("plain", d))
    engine = Engine(model, tok, reg)
    got = {}
    with torch.no_grad():
        seqs = [Sequence(prompt_ids(tok, p)[0].tolist(), SamplingParams(16, temperature=0.0), reg.acquire("plain"),
                         lambda e, i=i: got.__setitem__(i, e[1]["token_ids"]) if e[0] == "done" else None, tok)
                for i, p in enumerate(prompts)]  # fmt: skip
        engine._prefill(seqs)  # on this thread: the engine's steps, without its loop
        while engine._running:
            engine._decode(list(engine._running))
    assert [got[0], got[1]] == want
    assert json.loads((d / "qlora_engine.json").read_text())["base"] == "bf16"
