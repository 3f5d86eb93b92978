"""Chunked cross-entropy against the plain full-logits computation: value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from qlora_engine.train.loss import ChunkedCrossEntropy


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("chunk", [16, 1000])
def test_chunked_equals_full(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 50, 32, 300
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    loss = ChunkedCrossEntropy.apply(h, w, None, y, 80.0, chunk, softcap)
    (gh,) = torch.autograd.grad(loss * 3.0, h)
    h2 = h.detach().clone().requires_grad_()
    z = (h2 @ w.t()).float().double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, y, reduction="sum") / 80.0
    (gh2,) = torch.autograd.grad(ref * 3.0, h2)
    assert torch.allclose(loss.double(), ref, rtol=1e-5)
    assert torch.allclose(gh, gh2, rtol=1e-4, atol=1e-6)


def test_no_gradient_work_without_grad():
    h = torch.randn(10, 8)
    w = torch.randn(20, 8)
    loss = ChunkedCrossEntropy.apply(h, w, None, torch.zeros(10, dtype=torch.long), 10.0, 4, 0.0)
    assert not loss.requires_grad
