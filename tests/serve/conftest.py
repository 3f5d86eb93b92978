"""Fixtures of the serve tests: trained-looking random adapters."""

import pytest
import torch

from qlora_engine.lora.inject import add_lora
from qlora_engine.lora.peft_format import save_adapter
from qlora_engine.models.loader import load_model


def _random_adapter(base, out, r=8, targets="all-linear", seed=1, model=None, extra=None):
    """A trained-looking random adapter on `model` (default: `base` loaded in NF4): add_lora, then B
    drawn (it starts at zero)."""
    model = load_model(base, progress=False) if model is None else model
    add_lora(model, r=r, alpha=2 * r, target_modules=targets, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return save_adapter(model, out, base_model=str(base), extra=extra)


@pytest.fixture(scope="session")
def random_adapter():
    """random_adapter(base dir, out dir, r, target_modules, seed, model=, extra=) -> the saved adapter directory."""
    return _random_adapter
