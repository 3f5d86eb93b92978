"""What a request asks of decoding (`SamplingParams`) and the choice of each next token.

Temperature 0 is greedy: `torch.argmax` over the float32 logits, as transformers' `generate`
chooses, so a greedy answer is `qlora generate`'s. Otherwise the logits are divided by the
temperature, the smallest set of tokens holding `top_p` of the probability is kept, and a token is
drawn with the request's own generator (seeded by `seed`): a seeded answer does not depend on what
else runs in the batch. Touches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # for benchmarks: answers of exactly max_tokens tokens


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` [B, vocab] (float32)."""
    out = logits.argmax(-1).tolist()
    for b, p in enumerate(params):
        if p.temperature > 0:
            out[b] = sample(logits[b], p.temperature, p.top_p, generators[b])
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the mass before a token is under top_p: the first always stays
    return int(order[torch.multinomial(sorted_p * keep, 1, generator=generator)])
