"""Choosing the next token: greedy is argmax (first index on ties, as `generate`), a seeded draw
repeats, top_p keeps only the head of the distribution. < 1 s."""

import torch

from qlora_engine.serve.sampling import SamplingParams, next_tokens, sample


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_tokens(logits, [SamplingParams(4, temperature=0.0)] * 2, [None, None]) == [1, 0]
    wide = torch.randn(1000)
    draws = [[sample(wide, 1.0, 1.0, torch.Generator().manual_seed(s)) for _ in range(1)] for s in (7, 7, 8)]
    assert draws[0] == draws[1]
    g = torch.Generator().manual_seed(0)
    seen = {sample(wide, 1.0, 1.0, g) for _ in range(200)}
    assert len(seen) > 50  # really sampling


def test_top_p_keeps_the_smallest_head_holding_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 0.4, g) for _ in range(100)} == {0}  # 0.5 already holds 40%
    assert {sample(logits, 1.0, 0.7, g) for _ in range(300)} == {0, 1}  # 0.5 + 0.3 hold 70%
    assert {sample(logits, 1.0, 1.0, g) for _ in range(600)} == {0, 1, 2, 3}
