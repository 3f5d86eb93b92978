"""The per-row adapted layer: each row of a batch that mixes adapters (of different ranks and
scalings), rows without one and rows whose adapter skips the layer gets exactly (bit for bit) the
output of its own LoraLinear, on NF4 and dense bases, in decode [B, 1] and prefill [B, T] shapes;
slots are freed and reused. CPU, < 1 s."""

import pytest
import torch
from torch import nn

from qlora_engine.lora.linear import LoraLinear
from qlora_engine.quant.linear import NF4Linear
from qlora_engine.serve.multi_lora import MultiLoraLinear
from qlora_engine.serve.rows import Rows

K, N = 128, 192


def base_layer(kind: str, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    b = (torch.randn(N, generator=g) * 0.1).to(torch.bfloat16)
    if kind == "nf4":
        return NF4Linear.from_weight(w, b)
    lin = nn.Linear(K, N, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin.requires_grad_(False)


def adapter(base: nn.Module, r: int, alpha: float, rslora: bool, seed: int, dtype=torch.bfloat16) -> LoraLinear:
    torch.manual_seed(seed)
    lora = LoraLinear(base, r, alpha, use_rslora=rslora, dtype=dtype)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)  # trained-looking: B is zero only at the start
    return lora.eval()


@pytest.mark.parametrize("kind", ["nf4", "dense"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_each_row_equals_its_own_lora_layer_bit_for_bit(kind, tokens):
    base = base_layer(kind)
    # ranks 8, 8, 16 and 4; alpha/r = 2, 0.5, 2.67; rsLoRA; one adapter kept in float32 as PEFT may save it
    specs = [(8, 16, False, torch.bfloat16), (8, 4, False, torch.bfloat16), (16, 32, True, torch.bfloat16),
             (4, 16 / 6 * 4, False, torch.float32)]  # fmt: skip
    loras = [adapter(base, r, a, rs, seed=i, dtype=dt) for i, (r, a, rs, dt) in enumerate(specs)]
    rows = Rows()
    multi = MultiLoraLinear(base, rows, torch.bfloat16)
    for slot, lora in enumerate(loras, start=1):
        multi.add(slot, lora.lora_A.detach(), lora.lora_B.detach(), lora.scaling)
    slots = [0, 1, 2, 3, 4, 3, 1, 0, 2, 4, 4, 1, 5]  # 0: no adapter; 5: an adapter that does not adapt this layer
    x = (torch.randn(len(slots), tokens, K) * 0.5).to(torch.bfloat16)
    rows.set(slots)
    with torch.no_grad():
        y = multi(x)
        for b, slot in enumerate(slots):
            layer = loras[slot - 1] if 1 <= slot <= len(loras) else base
            want = layer(x[b : b + 1])
            assert torch.equal(y[b : b + 1], want), f"row {b} (slot {slot}) differs from its own layer"
    assert sorted(multi.banks) == [4, 8, 16]  # one stack per rank, not per adapter


def test_rows_without_adapters_get_the_base_and_freed_slots_are_reused():
    base = base_layer("nf4")
    rows = Rows()
    multi = MultiLoraLinear(base, rows, torch.bfloat16)
    a, b = adapter(base, 8, 16, False, seed=1), adapter(base, 8, 16, False, seed=2)
    multi.add(1, a.lora_A.detach(), a.lora_B.detach(), a.scaling)
    multi.add(2, b.lora_A.detach(), b.lora_B.detach(), b.scaling)
    x = torch.randn(3, 1, K).to(torch.bfloat16)
    rows.set([0, 0, 0])
    with torch.no_grad():
        assert torch.equal(multi(x), base(x))
        multi.remove(1)
        assert multi.banks[8].index == {2: 1} and multi.banks[8].free == [0]
        assert not multi.banks[8].A[0].any()  # the freed stack entry is zeroed
        c = adapter(base, 8, 16, False, seed=3)
        multi.add(3, c.lora_A.detach(), c.lora_B.detach(), c.scaling)
        assert multi.banks[8].index == {2: 1, 3: 0} and multi.banks[8].A.shape[0] == 2  # reused, not grown
        rows.set([3, 2, 1])  # slot 1 is gone: that row gets the base
        y = multi(x)
        assert torch.equal(y[0:1], c(x[0:1])) and torch.equal(y[1:2], b(x[1:2])) and torch.equal(y[2:3], base(x[2:3]))
        multi.remove(2)
        multi.remove(3)
        assert multi.banks == {}
