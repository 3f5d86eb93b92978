"""Recomputation per decoder layer gives the same gradients as keeping activations, dropout included."""

import torch

from qlora_engine import lora
from qlora_engine.models import loader
from qlora_engine.models.structure import decoder_layers
from qlora_engine.train import recompute
from qlora_engine.train.loss import causal_lm_loss


def grads(model_dir, checkpointing, offload=False, autocast=None):
    torch.manual_seed(0)
    model = loader.load_model(model_dir, **({"dtype": torch.float32} if autocast else {}))
    lora.add_lora(model, 4, 8, dropout=0.2, seed=1)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    if checkpointing:
        assert recompute.enable(model, offload=offload) == 2
    model.train()
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "position_ids": torch.arange(40).repeat(2, 1), "targets": ids.roll(-1, 1)}
    torch.manual_seed(5)  # same dropout draws in both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(saved)


def test_recompute_gradients_equal_and_save_less(tiny_dir):
    l0, g0, saved0 = grads(tiny_dir, checkpointing=False)
    l1, g1, saved1 = grads(tiny_dir, checkpointing=True)
    l2, g2, _ = grads(tiny_dir, checkpointing=True, offload=True)  # on CPU offload is a no-op
    assert l0 == l1 == l2
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * 2
    for k in g0:
        assert torch.equal(g0[k], g1[k]) and torch.equal(g0[k], g2[k]), k
        assert g0[k].abs().sum() > 0, f"{k} got no gradient (first layer needs the anchor)"
    assert saved1 < saved0 / 3


def test_disable_restores_forward(tiny_dir):
    model = loader.load_model(tiny_dir)
    recompute.enable(model)
    recompute.disable(model)
    _, layers = decoder_layers(model)
    assert all("forward" not in vars(layer) for layer in layers)


def test_recompute_replays_autocast(tiny_dir):
    """The recompute runs in backward, outside the caller's autocast region: it must restore it,
    or the layer is recomputed in another dtype and its gradients are those of a different function."""
    l0, g0, _ = grads(tiny_dir, checkpointing=False, autocast=torch.bfloat16)
    l1, g1, _ = grads(tiny_dir, checkpointing=True, autocast=torch.bfloat16)
    assert l0 == l1
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
