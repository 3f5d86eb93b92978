"""The engine's adapter, loaded by PEFT on the transformers + bitsandbytes 4-bit model, gives the engine's logits."""

import pytest
import torch

from qlora_engine.cli import main
from qlora_engine.lora import add_lora, lora_layers
from qlora_engine.lora.peft_format import save_adapter
from qlora_engine.models import loader

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_peft_on_bnb_reproduces_engine_logits(smollm2_dir, smollm2_tokenizer, tmp_path):
    engine = loader.load_model(smollm2_dir).eval()
    ids = smollm2_tokenizer("The capital of Quenlar is Ostrevane, a city on the river Sarn.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = engine(input_ids=ids).logits.float()
    add_lora(engine, r=8, alpha=16, dropout=0.05, seed=0)
    with torch.no_grad():  # an adapter that moves the model, as training would
        for layer in lora_layers(engine).values():
            layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(layer.lora_B)))
    adapter = save_adapter(engine, tmp_path / "adapter", str(smollm2_dir))
    with torch.no_grad():
        ours = engine.eval()(input_ids=ids).logits.float()
    effect = (ours - before).abs().max()
    assert effect > 1.0, "the adapter should have changed the model"
    # the same 4-bit bytes for bitsandbytes: the engine's checkpoint, loaded by transformers
    assert main(["quantize", "--model", str(smollm2_dir), "--out", str(tmp_path / "q4")]) == 0

    def peft_logits(**kw):
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
        model = peft.PeftModel.from_pretrained(base, str(adapter), **kw)
        assert len([n for n, _ in model.named_modules() if n.endswith("lora_A")]) == 210
        model.train()  # bnb's CPU eval mode repacks weights: compare in train mode with every dropout off
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    # PEFT computing the LoRA branch in bf16, as it does in training under bf16 autocast: identical
    same = peft_logits(autocast_adapter_dtype=False)
    assert torch.equal(same, ours)
    # PEFT's CPU default upcasts the adapter to fp32 (one rounding fewer): close, not identical
    up = peft_logits()
    diff, top1 = (up - ours).abs(), (up.argmax(-1) == ours.argmax(-1)).float().mean()
    print(f"\n[peft] adapter moves logits by up to {effect:.2f}; PEFT bf16: identical; PEFT fp32 upcast: "
          f"max |diff| {diff.max():.3f}, mean {diff.mean():.4f}, top-1 {top1:.3f}")
    assert diff.mean() < 0.05 * effect and top1 >= 0.9
