"""Attention for packed rows: the cumulative sample lengths the flash varlen call gets, the dispatch
(CPU: one exact SDPA call per sample), and the one-call path's layout, checked on the CPU against
the per-sample path with a reference kernel and with torch's own varlen_attn on the meta device."""

import pytest
import torch
import torch.nn.functional as F

from qlora_engine.train import attention

# row 0: samples of 5 and 7 tokens; row 1: 3, then 9 (its positions restart at 0 at index 3)
POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])


def qkv(heads=4, kv_heads=2, batch=2, tokens=12, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, tokens, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]


def reference_varlen(q, k, v, cu, longest, scale):
    """varlen_attn's contract on the CPU: [total, heads, D] inputs, sample i = rows cu[i]:cu[i+1], causal."""
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [t[s:e].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1))
    assert max(b - a for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())) == longest
    return torch.cat(out)


def test_cu_seqlens_from_position_ids():
    attention._cache["key"] = None
    cu, longest = attention.cu_seqlens(POS)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 12, 15, 24] and longest == 9
    assert attention.cu_seqlens(POS)[0] is cu  # once per forward pass: every layer gets the same position_ids
    cu1, longest1 = attention.cu_seqlens(torch.arange(7).unsqueeze(0))
    assert cu1.tolist() == [0, 7] and longest1 == 7
    assert attention.cu_seqlens(torch.tensor([[3, 4, 0, 1]]))[0].tolist() == [0, 2, 4]  # a row that starts mid-sample


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_one_call_layout_equals_the_per_sample_path(heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    attention._cache["key"] = None
    loop, _ = attention.varlen_attention(object(), q, k, v, None, scaling=0.3, position_ids=POS)
    one = attention.flash_varlen(q, k, v, POS, 0.3, kernel=reference_varlen)
    assert one.shape == loop.shape == (2, 12, heads, 8)
    assert torch.equal(one, loop)


def test_the_cpu_takes_the_exact_per_sample_path(monkeypatch):
    q, k, v = qkv(dtype=torch.bfloat16)
    assert not attention.use_flash(q)  # CPU, even in bf16 and with a kernel present
    monkeypatch.setattr(attention, "flash_varlen", lambda *a, **kw: pytest.fail("the CPU must not take the flash path"))
    out, _ = attention.varlen_attention(object(), q, k, v, None, scaling=None, position_ids=POS)
    first = F.scaled_dot_product_attention(q[:1, :, :5], k[:1, :, :5], v[:1, :, :5], is_causal=True, enable_gqa=True)
    assert torch.equal(out[0, :5], first[0].transpose(0, 1))  # sample 0 alone, bit for bit


def test_torch_varlen_attn_runs_the_one_call_path_on_meta():
    """torch's own varlen_attn (no CPU kernel; its meta kernel checks shapes and arguments)."""
    if attention.flash_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen and flash_attn is not installed")
    q, k, v = (t.to("meta") for t in qkv(dtype=torch.bfloat16))
    attention._cache["key"] = None
    out = attention.flash_varlen(q, k, v, POS, 0.3)
    assert out.shape == (2, 12, 4, 8) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.gpu
def test_cuda_flash_varlen_matches_the_per_sample_path():
    q, k, v = (t.cuda() for t in qkv(heads=8, kv_heads=2, tokens=12, dim=64, dtype=torch.bfloat16))
    pos = POS.cuda()
    assert attention.use_flash(q)
    attention._cache["key"] = None
    one, _ = attention.varlen_attention(object(), q, k, v, None, scaling=0.125, position_ids=pos)
    loop = torch.cat([torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                                is_causal=True, scale=0.125, enable_gqa=True)
                                 for s, e in segs], dim=2) for b, segs in enumerate(attention._segments(pos))])
    assert torch.allclose(one.float(), loop.transpose(1, 2).float(), atol=2e-2, rtol=0)
