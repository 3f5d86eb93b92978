"""The LoRA linear: the derived gradients against autograd (NF4 and dense bases, with dropout), a
zero start, scaling options, no randomness in eval, and the dropout mask."""

import math

import pytest
import torch
from torch import nn

from qlora_engine.errors import InputError
from qlora_engine.lora.linear import LoraLinear, keep_mask
from qlora_engine.quant.linear import NF4Linear


def make_layer(n=48, k=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    return NF4Linear.from_weight(w, b)


def reference_lora(x, w, bias, A, B, s, mask=None):
    xd = x if mask is None else x * mask
    return x @ w.t() + (bias if bias is not None else 0) + s * (xd @ A.t()) @ B.t()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
def test_lora_gradients_match_autograd(dropout, base_kind):
    torch.manual_seed(0)
    nf = make_layer()
    base = nf if base_kind == "nf4" else nn.Linear(40, 48).float()
    lora = LoraLinear(base, r=4, alpha=8, dropout=dropout, dtype=torch.float32)
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.train()
    x = torch.randn(6, 40, requires_grad=True)
    rng = torch.get_rng_state()
    y = lora(x)
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, lora.lora_A, lora.lora_B), g)

    torch.set_rng_state(rng)  # the same seed draw the layer made
    mask = None
    if dropout:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
        mask = keep_mask(x.shape, dropout, seed, x.device).float() / (1 - dropout)
        assert 0.5 < (mask > 0).float().mean() < 0.9
    w = nf.dequantize(torch.float32) if base_kind == "nf4" else base.weight
    bias = nf.bias.float() if base_kind == "nf4" else base.bias
    A, B = lora.lora_A.detach().requires_grad_(), lora.lora_B.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    y_ref = reference_lora(x2, w.detach(), bias.detach(), A, B, lora.scaling, mask)
    assert torch.allclose(y, y_ref, atol=1e-5)
    rdx, rdA, rdB = torch.autograd.grad(y_ref, (x2, A, B), g)
    for a, b in ((dx, rdx), (dA, rdA), (dB, rdB)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_lora_starts_equal_to_base_and_scaling_options():
    base = make_layer()
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    lora = LoraLinear(base, r=16, alpha=32)
    assert torch.equal(lora(x), base(x))
    assert lora.scaling == 2.0
    assert LoraLinear(make_layer(), r=16, alpha=32, use_rslora=True).scaling == 32 / math.sqrt(16)
    assert lora.lora_A.dtype == torch.bfloat16 and lora.lora_A.abs().max() <= 1 / math.sqrt(40) + 1e-3
    assert not any(p.requires_grad for p in base.parameters())


def test_lora_eval_consumes_no_randomness():
    lora = LoraLinear(make_layer(), r=4, alpha=4, dropout=0.5)
    lora.eval()
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    before = torch.get_rng_state()
    lora(x)
    assert torch.equal(before, torch.get_rng_state())


def test_bad_lora_settings():
    with pytest.raises(InputError, match="rank"):
        LoraLinear(make_layer(), r=0, alpha=1)
    with pytest.raises(InputError, match="dropout"):
        LoraLinear(make_layer(), r=2, alpha=1, dropout=1.0)


def test_dropout_mask_rate_and_determinism():
    m = keep_mask((1000, 999), 0.1, seed=7, device=torch.device("cpu"))
    assert m.shape == (1000, 999) and m.dtype == torch.bool
    flat = m.view(-1).float()
    for part in (flat, flat[0::2], flat[1::2]):  # both halves of each random draw
        assert abs(part.mean().item() - 0.9) < 0.003
    assert torch.equal(m, keep_mask((1000, 999), 0.1, seed=7, device=torch.device("cpu")))
    assert not torch.equal(m, keep_mask((1000, 999), 0.1, seed=8, device=torch.device("cpu")))
