"""The frozen NF4 linear: forward and input gradient against a dense layer, nothing weight-sized saved, bnb state-dict keys."""

import torch

from qlora_engine.quant.linear import NF4Linear


def make_layer(n=48, k=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    return NF4Linear.from_weight(w, b)


def test_nf4_linear_forward_backward_match_dense():
    layer = make_layer()
    w = layer.dequantize(torch.float32)
    x = torch.randn(2, 3, 40, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    y_ref = x @ w.t() + layer.bias.float()
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(dx, g @ w, atol=1e-5)


def test_nothing_weight_sized_is_saved_for_backward():
    layer = make_layer(n=256, k=128, bias=False)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.numel() >= 256 * 128 for t in saved)


def test_state_dict_uses_bnb_keys_and_roundtrips():
    layer = make_layer()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}  # fmt: skip
    other = NF4Linear(40, 48, bias=True)
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize(), layer.dequantize())
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    assert torch.equal(other(x), layer(x))
