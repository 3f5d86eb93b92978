"""The layer weight pipeline: training with it is bit-identical to the per-call path (fp32 and bf16,
with and without recompute, the base resident or offloaded), the blocks are loaded one ahead in
both directions (never on demand), as many times per step as `block_loads` says (what the planner
counts), and the layers fall back to their own path whenever the pipeline cannot serve them."""

import pytest
import torch

from qlora_engine import lora
from qlora_engine.models import loader
from qlora_engine.models.structure import decoder_layers
from qlora_engine.quant.linear import NF4Linear
from qlora_engine.quant.pipeline import PARTS, WeightPipeline, block_loads, nf4_layers
from qlora_engine.train import attention, recompute
from qlora_engine.train.loss import causal_lm_loss

LAYERS = 4


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    from qlora_engine.models.synthetic import random_checkpoint

    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False)
    return random_checkpoint(tmp_path_factory.mktemp("pipe") / "m", cfg, std=0.05, seed=0)


def train(model_dir, dtype, checkpointing, pipeline, offload=False, steps=3, device="cpu", record=None):
    """Losses, gradients per step and final adapter of a few AdamW steps on packed rows; and the pipeline."""
    torch.manual_seed(0)
    model = loader.load_model(model_dir, device, dtype=dtype, progress=False)
    lora.add_lora(model, 4, 8, dropout=0.1, seed=1, dtype=dtype)
    attention.use_varlen(model)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    if checkpointing:
        recompute.enable(model)
    pipe = None
    if pipeline:
        pipe = WeightPipeline(decoder_layers(model)[1], device, dtype, offload=offload).hook_blocks()
        if record is not None:
            inner = pipe._load
            pipe._load = lambda j: record.append(j) or inner(j)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    for s in range(steps):
        ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3 + s)).to(device)
        pos = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1).to(device)  # two samples per row
        loss, _ = causal_lm_loss(model, {"input_ids": ids, "position_ids": pos, "targets": ids.roll(-1, 1)})
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params], pipe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep", "recompute"])
def test_training_is_bit_identical_with_the_pipeline(four_blocks, dtype, checkpointing):
    steps = 3
    ref_loss, ref_grads, ref_adapter, _ = train(four_blocks, dtype, checkpointing, False, steps=steps)
    for offload in (False, True):
        loss, grads, adapter, pipe = train(four_blocks, dtype, checkpointing, True, offload, steps=steps)
        assert loss == ref_loss, offload
        for g, r in zip(grads, ref_grads):
            assert all(torch.equal(a, b) for a, b in zip(g, r)), offload
        assert all(torch.equal(a, b) for a, b in zip(adapter, ref_adapter)), offload
        # every NF4 matmul was served from the buffer, none on demand: forward (+ recompute) + backward of 7
        # linears per block; without recompute block 0's q/k/v read the frozen embedding: no input gradient
        matmuls = (3 * 7 * LAYERS) if checkpointing else (2 * 7 * LAYERS - 3)
        assert pipe.stats["hits"] == steps * matmuls
        assert pipe.stats["misses"] == 0 and pipe.stats["fallbacks"] == 0
        # the first step starts from empty slots; then each step loads what block_loads (the planner's count) says
        assert pipe.stats["loads"] == (2 * LAYERS - 2) + (steps - 1) * block_loads(LAYERS)
        if offload:
            per_block = pipe.host_bytes() // LAYERS
            assert pipe.stats["copied_bytes"] == pipe.stats["loads"] * per_block
            assert all(getattr(m, n).device.type == "cpu" for m in pipe.all_layers() for n in PARTS
                       if getattr(m, n) is not None)  # fmt: skip
        else:
            assert pipe.stats["copied_bytes"] == 0


def test_blocks_are_loaded_one_ahead_in_both_directions(four_blocks):
    for checkpointing in (False, True):
        order = []
        train(four_blocks, torch.float32, checkpointing, True, steps=2, record=order)
        # forward 0..3 (each loaded while the one before computes); the backward finds 3 and 2 still
        # there and loads 1, then 0; the next forward finds 0 and 1, and so on
        assert order == [0, 1, 2, 3, 1, 0] + [2, 3, 1, 0], (checkpointing, order)


def block_of(layer):
    return torch.nn.ModuleList([layer])


def make_layer(n=96, k=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return NF4Linear.from_weight((torch.randn(n, k, generator=g) * 0.1).to(dtype))


def test_the_matmuls_read_the_buffer_and_fall_back_when_it_cannot_serve():
    layer = make_layer()
    x = torch.randn(5, 64)
    ref = layer(x)
    pipe = WeightPipeline([block_of(layer)], "cpu", torch.float32)
    layer.train()
    assert torch.equal(layer(x), ref) and pipe.stats["misses"] == 1  # training: loaded on demand
    pipe.buffer.zero_()
    assert torch.equal(layer(x), torch.zeros_like(ref)), "the matmul did not use the buffer"
    pipe.invalidate()
    assert torch.equal(layer(x), ref) and pipe.stats["loads"] == 2
    layer.eval()
    pipe.invalidate()
    assert torch.equal(layer(x), ref) and pipe.stats["fallbacks"] == 1  # eval: the per-call path, nothing loaded
    layer.train()
    assert torch.equal(layer(x.double()), x.double() @ layer.dequantize(torch.float64).t())  # another dtype: per call
    assert pipe.stats["fallbacks"] == 2
    pipe.close()
    assert layer.pipeline is None and torch.equal(layer(x), ref)


def test_offload_keeps_the_codes_on_the_host_and_restores_them():
    layer = make_layer()
    before = {n: getattr(layer, n).clone() for n in PARTS if getattr(layer, n) is not None}
    x = torch.randn(3, 64)
    ref = layer(x)
    pipe = WeightPipeline([block_of(layer)], "cpu", torch.float32, offload=True)
    assert pipe.host_bytes() == sum(t.numel() * t.element_size() for t in before.values())
    assert pipe.device_bytes() >= pipe.host_bytes() + 96 * 64 * 4  # staging row + buffer row
    layer.eval()  # offloaded: loaded even in eval, the per-call path cannot read host weights on a device
    pipe.profile = True
    assert torch.equal(layer(x), ref) and pipe.stats["copied_bytes"] == pipe.host_bytes()
    copy, deq = pipe.timings()
    assert copy > 0 and deq > 0 and pipe.marks == []
    with pytest.raises(RuntimeError, match="offloaded base computes in torch.float32"):
        layer(x.double())
    pipe.close()
    assert all(torch.equal(getattr(layer, n), t) for n, t in before.items())


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="holds an NF4Linear"):
        WeightPipeline([torch.nn.Linear(4, 4)], "cpu")
    layer = make_layer()
    with pytest.raises(ValueError, match="appears in blocks 0 and 1"):
        WeightPipeline([block_of(layer), block_of(layer)], "cpu")
    with pytest.raises(ValueError, match="at least 2 slots"):
        WeightPipeline([block_of(layer)], "cpu", slots=1)


def test_block_loads():
    assert [block_loads(n) for n in (1, 2, 3, 4, 32)] == [0, 0, 2, 4, 60]
    assert nf4_layers(block_of(make_layer())) and not nf4_layers(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_cuda_side_stream_pipeline_matches_the_per_call_path(four_blocks):
    """On CUDA the loads run on a side stream ordered by events: a race would show as garbage. The
    per-call path (dequantize kernel + cuBLAS) and the pipeline (same kernel into the buffer + cuBLAS)
    compute the same products; cuBLAS may pick another algorithm for another pointer, hence the bound."""
    for offload in (False, True):
        ref, _, ref_adapter, _ = train(four_blocks, torch.bfloat16, True, False, steps=4, device="cuda")
        got, _, adapter, pipe = train(four_blocks, torch.bfloat16, True, True, offload, steps=4, device="cuda")
        assert pipe.stats["misses"] == 0 and pipe.stats["hits"] > 0
        for a, b in zip(got, ref):
            assert abs(a - b) <= 1e-3 * abs(b), (offload, got, ref)
        if offload:
            layer = next(iter(pipe.all_layers()))
            assert layer.weight.device.type == "cpu" and layer.weight.is_pinned()
