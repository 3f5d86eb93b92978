"""Serving-only LoRA: one adapted linear layer that applies a different adapter to each row of a batch.

`MultiLoraLinear` wraps a frozen base linear (`NF4Linear` or `nn.Linear`) and holds, for each rank
in use, the stacked A and B of every loaded adapter that adapts this layer (a `RankBank`). Before a
forward the engine writes each row's adapter slot into the shared `rows.Rows`; the layer then gathers
each row's A and B and adds s·(x·Aᵀ)·Bᵀ with two batched matmuls: one pass for all rows whose
adapters share a rank, never one pass per adapter. A row with no adapter, or whose adapter does not
adapt this layer, gets the base output alone.

The arithmetic is `lora.linear.LoraLinear`'s, op for op and in the same dtype (x·Aᵀ and ·Bᵀ in the
compute dtype, the product with the scaling in float32 rounded once, then added to the base output),
so a row's output equals the adapter's own LoraLinear bit for bit (tests/serve/test_multi_lora.py).
Training never sees this layer; it touches only the modules the adapter registry hands it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import autocast_input, base_forward
from .rows import Rows


class RankBank:
    """The A [n, r, in], B [n, out, r] and float32 scalings [n] of the adapters of one rank on one
    layer; `index` maps an adapter slot to its position. Capacity doubles when full; a freed
    position is zeroed and reused."""

    def __init__(self, r: int, in_features: int, out_features: int, dtype: torch.dtype, device):
        self.r = r
        self.A = torch.zeros(1, r, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(1, out_features, r, dtype=dtype, device=device)
        self.scale = torch.zeros(1, dtype=torch.float32, device=device)
        self.index: dict[int, int] = {}
        self.free = [0]

    def put(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        if not self.free:
            n = self.A.shape[0]
            self.A = torch.cat([self.A, torch.zeros_like(self.A)])
            self.B = torch.cat([self.B, torch.zeros_like(self.B)])
            self.scale = torch.cat([self.scale, torch.zeros_like(self.scale)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        pos = self.free.pop()
        self.A[pos].copy_(A)
        self.B[pos].copy_(B)
        self.scale[pos] = scaling
        self.index[slot] = pos

    def drop(self, slot: int) -> None:
        pos = self.index.pop(slot, None)
        if pos is not None:
            self.A[pos].zero_()
            self.B[pos].zero_()
            self.scale[pos] = 0.0
            self.free.append(pos)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.scale))


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus, per row, the low-rank update of that row's adapter (module docstring)."""

    def __init__(self, base: nn.Module, rows: Rows, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.dtype = dtype
        self.in_features, self.out_features = base.in_features, base.out_features
        self.banks: dict[int, RankBank] = {}

    @property
    def weight(self):
        return self.base_layer.weight

    def add(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put an adapter's A [r, in] and B [out, r] (cast to the compute dtype) under `slot`."""
        r = A.shape[0]
        bank = self.banks.get(r)
        if bank is None:
            device = self.base_layer.weight.device
            bank = self.banks[r] = RankBank(r, self.in_features, self.out_features, self.dtype, device)
        bank.put(slot, A.to(self.dtype), B.to(self.dtype), scaling)

    def remove(self, slot: int) -> None:
        for r, bank in list(self.banks.items()):
            bank.drop(slot)
            if not bank.index:
                del self.banks[r]  # an empty bank would cost a gather on every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        slots = self.rows.slots
        n = len(slots)
        x3 = x.reshape(n, -1, self.in_features)
        y = base_forward(self.base_layer, x3.reshape(-1, self.in_features)).view(n, -1, self.out_features)
        for bank in self.banks.values():
            pos = [bank.index.get(s, -1) for s in slots]
            rows = [i for i, p in enumerate(pos) if p >= 0]
            if not rows:
                continue
            at = torch.tensor([pos[i] for i in rows], device=x.device)
            # one bmm for all rows of this rank; each row's bits equal LoraLinear's 2-D matmul as
            # long as the BLAS reduces an output element the same way whatever the batch, which
            # tests/serve/test_multi_lora.py checks on the machine it runs on
            if len(rows) == n:
                xs = x3
            else:
                sel = torch.tensor(rows, device=x.device)
                xs = x3[sel]
            h = torch.bmm(xs, bank.A[at].transpose(1, 2))
            # bf16 · float32 scale -> float32, rounded once: what `tensor * python float` does in LoraLinear
            d = (torch.bmm(h, bank.B[at].transpose(1, 2)) * bank.scale[at].view(-1, 1, 1)).to(y.dtype)
            if len(rows) == n:
                y = y + d
            else:
                y[sel] = y[sel] + d
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        n = sum(len(b.index) for b in self.banks.values())
        return f"in={self.in_features}, out={self.out_features}, ranks={sorted(self.banks)}, adapters={n}"
