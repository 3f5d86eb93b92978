"""LoRA on any module: Linear, Embedding, Conv1d/Conv2d in a plain MLP, a small CNN and a
transformers model; loralib's semantics (LoRA-only state dict, merge on eval, unmerge on train);
the PEFT format for embeddings and convolutions, checked against PEFT itself."""

import pytest
import torch
from torch import nn

from qlora_engine.errors import InputError
from qlora_engine.lora import (LoraConv, LoraEmbedding, LoraLinear, add_lora, lora_layers, lora_state_dict,
                               mark_only_lora_as_trainable, merge_lora, unmerge_lora)  # fmt: skip
from qlora_engine.lora.inject import load_lora_state_dict
from qlora_engine.lora.peft_format import load_adapter, peft_state_dict, save_adapter


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(8, 4, 1)
        self.head = nn.Linear(4 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # [B, 8, 4, 4]
        h = self.seq(h.flatten(2))  # [B, 4, 16]
        return self.head(h[..., :8].flatten(1))


def _nudge(model, seed=0):
    """A trained-looking adapter: B (or A for embeddings) away from its zero start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            zero = layer.lora_A if isinstance(layer, LoraEmbedding) else layer.lora_B
            zero.copy_(torch.randn(zero.shape, generator=g) * 0.1)


def test_every_kind_is_adapted_and_starts_equal_to_the_base():
    torch.manual_seed(0)
    mlp, cnn = MLP(), CNN()
    ids, x = torch.randint(0, 50, (4, 7)), torch.randn(2, 3, 8, 8)
    ref_mlp, ref_cnn = mlp(ids), cnn(x)
    assert add_lora(mlp, r=4, alpha=8, target_modules=["emb", "fc1", "fc2"], dtype=torch.float32) == ["emb", "fc1", "fc2"]
    assert add_lora(cnn, r=4, alpha=8, target_modules=["c1", "c2", "seq"], dtype=torch.float32) == ["c1", "c2", "seq"]
    kinds = {n: type(m) for n, m in {**lora_layers(mlp), **lora_layers(cnn)}.items()}
    assert kinds == {"emb": LoraEmbedding, "fc1": LoraLinear, "fc2": LoraLinear, "c1": LoraConv, "c2": LoraConv,
                     "seq": LoraConv}  # fmt: skip
    assert torch.equal(mlp(ids), ref_mlp) and torch.equal(cnn(x), ref_cnn)
    trainable = {n for n, p in cnn.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in ("c1", "c2", "seq") for ab in "AB"}


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_adapted_output_equals_the_merged_weight_and_training_learns(which):
    torch.manual_seed(1)
    model, inputs = (MLP(), torch.randint(0, 50, (16, 7))) if which == "mlp" else (CNN(), torch.randn(16, 3, 8, 8))
    targets = ["emb", "fc1", "fc2"] if which == "mlp" else ["c1", "c2", "seq", "head"]
    add_lora(model, r=4, alpha=8, target_modules=targets, dtype=torch.float32)
    _nudge(model)
    adapted = model(inputs)
    for layer in lora_layers(model).values():  # the delta has the base weight's shape and is what merging adds
        assert layer.delta_weight().shape == layer.base_layer.weight.shape
    merge_lora(model)
    assert torch.allclose(model(inputs), adapted, atol=1e-5)
    unmerge_lora(model)
    assert torch.equal(model(inputs), adapted)
    # a few steps of plain training lower the loss; only LoRA tensors move
    labels = torch.randint(0, model(inputs).shape[-1], (16,))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merge_on_eval_and_unmerge_on_train_are_exact():
    torch.manual_seed(2)
    model = MLP()
    base_w = model.fc1.weight.detach().clone()
    add_lora(model, r=4, alpha=8, target_modules=["emb", "fc1"], dtype=torch.float32, merge_on_eval=True)
    _nudge(model)
    ids = torch.randint(0, 50, (4, 7))
    model.train()
    train_out = model(ids)
    model.eval()
    assert all(layer.merged for layer in lora_layers(model).values())
    assert not torch.equal(model.fc1.base_layer.weight, base_w)  # merged: the base runs alone
    assert torch.allclose(model(ids), train_out, atol=1e-5)
    model.train()
    assert torch.equal(model.fc1.base_layer.weight, base_w)  # the exact original, not W + d - d


def test_lora_only_state_dict_round_trips_and_mark_only_lora():
    torch.manual_seed(3)
    a, b = CNN(), CNN()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        add_lora(m, r=2, alpha=4, target_modules=["c1", "head"], dtype=torch.float32)
    _nudge(a)
    sd = lora_state_dict(a)
    assert set(sd) == {"c1.lora_A", "c1.lora_B", "head.lora_A", "head.lora_B"}
    load_lora_state_dict(b, sd)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    with pytest.raises(InputError, match="does not fit"):
        load_lora_state_dict(b, {"c1.lora_A": sd["c1.lora_A"]})
    mark_only_lora_as_trainable(a, bias="lora_only")
    assert {n for n, p in a.named_parameters() if p.requires_grad} == set(sd) | {"c1.base_layer.bias", "head.base_layer.bias"}


def test_unsupported_targets_are_one_line():
    with pytest.raises(InputError, match="matched no layer"):
        add_lora(MLP(), target_modules=["nope"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(InputError, match="grouped convolution"):
        add_lora(grouped, target_modules=["0"])


def test_peft_reads_our_conv_and_embedding_adapters(tmp_path):
    """Our PEFT-format tensors, put into PEFT's own LoRA model of the same CNN/MLP, give our outputs."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    for make, targets, inputs in ((CNN, ["c1", "c2", "seq", "head"], torch.randn(2, 3, 8, 8)),
                                  (MLP, ["emb", "fc1"], torch.randint(0, 50, (3, 7)))):  # fmt: skip
        ours, base = make(), make()
        base.load_state_dict(ours.state_dict())
        add_lora(ours, r=4, alpha=8, target_modules=targets, dtype=torch.float32)
        _nudge(ours)
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        loaded = peft.set_peft_model_state_dict(theirs, peft_state_dict(ours))
        assert not loaded.unexpected_keys
        ours.eval(), theirs.eval()
        assert torch.allclose(ours(inputs), theirs(inputs), atol=1e-5), make.__name__


def test_transformers_model_with_embedding_adapter_saves_and_loads(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(tmp_path / "m", "llama", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_lora(model, r=4, alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"], dtype=torch.float32)
    _nudge(model)
    save_adapter(model, tmp_path / "adapter", str(path))
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    names = load_adapter(again, tmp_path / "adapter")
    assert "model.embed_tokens" in names and isinstance(again.model.embed_tokens, LoraEmbedding)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                        str(tmp_path / "adapter")).eval()  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
