"""Next-token cross-entropy computed in chunks of tokens, never holding fp32 logits for the batch.

Only positions that have a target are projected through `lm_head` at all (prompt tokens masked by
the data pipeline cost nothing here), and at most `chunk` of them at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import IGNORE


class ChunkedCrossEntropy(torch.autograd.Function):
    """loss = Σ_i CE(softcap(h_i · Wᵀ), y_i) / n over the selected positions i.

    With z = h·Wᵀ (fp32), p = softmax(z): dloss/dz = (p − onehot(y)) / n, and with soft-capping
    z' = c·tanh(z/c): dz'/dz = 1 − tanh²(z/c). Then dloss/dh = dloss/dz · W. The forward computes
    this per chunk and keeps only dloss/dh ([N, H], h's dtype); W (lm_head) is frozen.
    Peak extra memory: about 8 × chunk × vocab bytes (16-20 with soft-capping). The memory planner
    measures it by running this very forward on the meta device (`plan.livebytes.loss_buffers`).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, n, chunk, softcap):
        need_grad = h.requires_grad
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], targets[s : s + chunk]
            z = (hc @ weight.t() if bias is None else torch.addmm(bias, hc, weight.t())).float()
            if softcap:
                t = torch.tanh(z / softcap)
                z = softcap * t
            lse = torch.logsumexp(z, dim=-1)
            r = rows[: hc.shape[0]]
            total += (lse - z[r, yc]).sum()
            if need_grad:
                p = torch.exp_(z.sub_(lse[:, None]))  # softmax, in place of z
                p[r, yc] -= 1.0
                if softcap:
                    p.mul_(1.0 - t * t)
                grad_h[s : s + chunk] = (p.div_(n)).to(h.dtype) @ weight
            z = p = t = None  # free this chunk's logits before the next chunk allocates its own
        ctx.save_for_backward(grad_h)
        return total / n

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None, None, None, None


def causal_lm_loss(model: nn.Module, batch: dict, n_norm: float | None = None, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses / n_norm, number of target tokens) for a batch from `data.collate`.

    `n_norm` defaults to this batch's target count; gradient accumulation passes the count of the
    whole optimizer step so every token weighs the same.
    """
    targets = batch["targets"]
    hidden = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    sel = targets != IGNORE
    n = int(sel.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the chunked loss needs lm_head to be a plain frozen nn.Linear, found {type(head).__name__}; do not put adapters on it")
    h = hidden[sel]
    softcap = getattr(model.config, "final_logit_softcapping", None) or 0.0
    loss = ChunkedCrossEntropy.apply(h, head.weight, head.bias, targets[sel], float(n_norm or n), chunk, softcap)
    return loss, n
