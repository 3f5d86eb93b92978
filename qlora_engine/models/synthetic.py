"""Random-weight checkpoints of any architecture and size, for tests and benchmarks.

One builder for every caller: the tests' tiny models, the planner validation's 1B-13B shapes and
`scripts/make_random_model.py`. Weights are N(0, std), norms 1 and biases 0, so the matmul shapes
and a step's arithmetic are those of the real model (all a throughput or memory figure measures).
Tensors are generated one at a time from a meta-device model; with `quant` the decoder-block
linears are written already in 4 bits (bitsandbytes keys), so even 13B shapes are written and
loaded quickly. The directory is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .structure import block_linear_names
from .tensorfiles import ShardedWriter, atomic_directory, copy_side_files, save_tensors


def word_level_tokenizer(d: Path) -> None:
    """A minimal word-level tokenizer (<unk>, <pad>, </s>): enough for code that loads one and never tokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>").save_pretrained(d)


def hf_config(config: dict):
    """A transformers config from a config.json-style dict (which names its model_type)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kw)


def random_checkpoint(out: str | Path, config: dict, *, std: float = 0.02, seed: int = 0, dtype=torch.bfloat16,
                      quant=None, tokenizer: str | Path | None = None, device: str = "cpu",
                      force: bool = False) -> Path:  # fmt: skip
    """Write a random checkpoint of `config` to `out` and return it.

    `quant`: a `loader.QuantSpec` to store the block linears in 4 bits. `tokenizer`: a checkpoint
    directory to copy the tokenizer (and chat template) from, "word-level" for a minimal one, or
    None for none. `device`: where the random numbers are drawn (CUDA is much faster for 7B+).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..quant import nf4

    cfg = hf_config(config)
    with init_empty_weights(include_buffers=False):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    head = meta.get_output_embeddings()
    tied = getattr(cfg, "tie_word_embeddings", False) and head is not None
    params = [(n, p) for n, p in meta.named_parameters() if not (tied and p is head.weight and n.startswith(_head_name(meta)))]
    quantized = set(block_linear_names(meta)) if quant is not None else set()
    gen = torch.Generator(device=device).manual_seed(seed)

    def value(name: str, p) -> torch.Tensor:
        if p.dim() >= 2:
            return torch.empty(p.shape, dtype=dtype, device=device).normal_(0, std, generator=gen)
        return torch.full(p.shape, float("norm" in name), dtype=dtype, device=device)  # norms 1, biases 0

    with atomic_directory(Path(out), force=force) as tmp:
        if quantized:
            items = []
            for name, p in params:
                owner = name.rsplit(".", 1)[0]
                if name.endswith(".weight") and owner in quantized:
                    packed, state = nf4.quantize_4bit(value(name, p), quant.blocksize, quant.quant_type, quant.double_quant)
                    items.append((name, packed.cpu()))
                    items += [(f"{owner}.{k}", v.cpu()) for k, v in state.state_dict("weight").items()]
                else:
                    items.append((name, value(name, p).cpu()))
            save_tensors(tmp, items)
        else:
            writer = ShardedWriter(tmp, [(n, dtype, tuple(p.shape)) for n, p in params], 5 << 30)
            for name, p in params:
                writer.write(name, value(name, p).cpu())
            writer.close()
        cfg.save_pretrained(tmp)
        if tokenizer == "word-level":
            word_level_tokenizer(tmp)
        elif tokenizer is not None:
            copy_side_files(Path(tokenizer), tmp)  # tokenizer, chat template; never config.json
    return Path(out)


def _head_name(model) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)
