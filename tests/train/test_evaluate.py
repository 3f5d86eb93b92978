"""SmolLM2-135M-Instruct perplexity on GPL-3: the engine's NF4+DQ against transformers + bitsandbytes."""

import pytest
import torch

from qlora_engine.models import loader
from qlora_engine.train.evaluate import DEFAULT_TEXT, perplexity, token_windows

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_engine_perplexity_equals_bitsandbytes(smollm2_dir, smollm2_tokenizer, tmp_path):
    if not DEFAULT_TEXT.exists():
        pytest.skip(f"{DEFAULT_TEXT} not on this machine")
    windows = token_windows(smollm2_tokenizer, DEFAULT_TEXT.read_text(), 512, max_windows=3)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    bnb = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg, dtype=torch.bfloat16,
                                                            device_map="cpu").train()  # fmt: skip
    ppl_bnb = perplexity(bnb, windows)["ppl"]
    bnb.save_pretrained(tmp_path / "bnb-q4")
    del bnb
    ppl_on_bnb_bytes = perplexity(loader.load_model(tmp_path / "bnb-q4").train(), windows)["ppl"]
    ppl_engine = perplexity(loader.load_model(smollm2_dir).train(), windows)["ppl"]
    print(f"\n[ppl] bnb {ppl_bnb:.4f}  engine on bnb bytes {ppl_on_bnb_bytes:.4f}  engine-quantized {ppl_engine:.4f}")
    assert f"{ppl_on_bnb_bytes:.4f}" == f"{ppl_bnb:.4f}"  # same bytes, same compute: same digits
    # engine-quantized: nested codes are nearest where bnb's CPU lookup table is not (~0.15% of them)
    assert abs(ppl_engine - ppl_bnb) / ppl_bnb < 5e-3
