"""`python -m qlora_engine.generate`: stream an answer from a trained model, or chat with it.

    python -m qlora_engine.generate --model BASE --adapter RUN/adapter --prompt "What is ...?"
    python -m qlora_engine.generate --model RUN/merged --chat

Two kinds of model: the NF4 base plus an adapter, built exactly as training built it (the adapter's
provenance says which base: NF4 with its block size, or 16-bit for plain LoRA), or a plain
checkpoint such as an export, loaded by transformers alone (a 4-bit checkpoint goes through the
engine's loader). Prompts go through the tokenizer's chat template when it has one; generation stops
at the end-of-sequence token. `generate()` is the function behind the command and the sample answer
printed after an export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from . import default_model, loader, lora
from .loader import QuantSpec, load_config, load_model
from .tensorfiles import list_tensors

# train.build_model loads every base in bf16; a model rebuilt for an adapter must match it.
TRAIN_DTYPE = torch.bfloat16
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def provenance(adapter_dir: str | Path) -> tuple[str, QuantSpec, bool]:
    """(base kind "nf4" or "bf16", QuantSpec, whether training recorded them) for an adapter.

    Adapters saved by `train.py` record how their base was built (`lora.read_provenance`); others
    (e.g. from PEFT) get the engine's defaults, NF4 blocksize 64 with double quantization.
    """
    info = lora.read_provenance(adapter_dir)
    kind = info.get("base", "nf4")
    if kind not in ("nf4", "bf16"):
        raise ValueError(f"{adapter_dir}: the adapter's provenance names base {kind!r}; expected nf4 or bf16")
    spec = QuantSpec(int(info.get("blocksize", 64)), info.get("quant_type", "nf4"), bool(info.get("double_quant", True)))
    return kind, spec, bool(info)


def adapter_base(adapter_dir: str | Path) -> Path:
    """The base checkpoint an adapter names (base_model_name_or_path), as a directory."""
    cfg_path = Path(adapter_dir) / lora.ADAPTER_CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: an adapter directory needs {lora.ADAPTER_CONFIG} and {lora.ADAPTER_WEIGHTS}")
    name = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{cfg_path} names no base model: pass --model")
    return default_model.resolve(name)


def is_4bit_checkpoint(model_dir: str | Path) -> bool:
    """Whether the checkpoint holds 4-bit (bitsandbytes-format) weights."""
    return bool(loader.quantized_prefixes(list_tensors(Path(model_dir))))


def load_trained(base_dir: str | Path, adapter_dir: str | Path, device="cpu") -> torch.nn.Module:
    """The model an adapter was trained as: its base built as in training, plus the adapter; eval mode."""
    from transformers import AutoModelForCausalLM

    kind, spec, _ = provenance(adapter_dir)
    if kind == "nf4":
        model = load_model(base_dir, device, TRAIN_DTYPE, spec)
    else:
        if is_4bit_checkpoint(base_dir):
            raise ValueError(f"{adapter_dir} was trained on 16-bit weights (plain LoRA) but {base_dir} is a 4-bit checkpoint: "
                             f"give the 16-bit checkpoint")  # fmt: skip
        load_config(base_dir)  # one-line error for a bad directory
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=TRAIN_DTYPE).to(device)
        model.requires_grad_(False)
    lora.load_adapter(model, adapter_dir)
    return model.eval()  # the engine's LoRA dropout is off outside training; nothing else changes


def load_plain(model_dir: str | Path, device="cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A checkpoint without adapter: transformers for 16-bit weights (its own dtype unless given),
    the engine's loader for a 4-bit checkpoint; eval mode."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir)
    if is_4bit_checkpoint(model_dir):
        return load_model(model_dir, device, dtype or TRAIN_DTYPE).eval()
    dtype = dtype or DTYPE_NAMES.get(str(getattr(config, "dtype", None) or "").replace("torch.", ""), TRAIN_DTYPE)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_ids(tokenizer, prompt_or_messages) -> torch.Tensor:
    """[1, T] prompt tokens: the chat template with a generation prompt when the tokenizer has one."""
    messages = prompt_or_messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    text = "\n".join(m["content"] for m in messages)  # no template: the text as it is
    return tokenizer(text, return_tensors="pt").input_ids


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _streamer(tokenizer, on_text: Callable[[str], None]):
    """transformers' TextStreamer (text cut at word boundaries as tokens arrive, prompt skipped),
    sending each piece to `on_text` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_or_messages, max_new_tokens: int = 256, temperature: float = 0.0,
                 on_text: Callable[[str], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [T], new ids [N]); N < max_new_tokens means the model ended with an EOS token,
    which is the last new id. temperature 0 is greedy decoding."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt_or_messages).to(device)
    eos = eos_ids(model, tokenizer)
    sampling = temperature > 0
    # a fresh config, so a checkpoint's sampling defaults (top_p, ...) neither apply nor warn
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
                           top_p=None, top_k=None, eos_token_id=eos, use_cache=True,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                             streamer=_streamer(tokenizer, on_text) if on_text else None)  # fmt: skip
    finally:
        model.train(was_training)
    return ids[0].cpu(), out[0, ids.shape[1] :].cpu()


def generate(model, tokenizer, prompt_or_messages, max_new_tokens: int = 256, temperature: float = 0.0,
             on_text: Callable[[str], None] | None = None) -> str:
    """The answer to a prompt (a user message) or a list of chat messages, streamed to `on_text`
    piece by piece when given; greedy when temperature is 0."""
    _, new = generate_ids(model, tokenizer, prompt_or_messages, max_new_tokens, temperature, on_text)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def quiet_loading() -> None:
    """No per-tensor progress bars from transformers' loading: a command's output is its answer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(model, tokenizer, max_new_tokens: int, temperature: float, stdin=None) -> list[dict]:
    """Read user turns from stdin until EOF or an empty line; answer each with the whole history."""
    stdin = stdin or sys.stdin
    history: list[dict] = []
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return history
        history.append({"role": "user", "content": line.strip()})
        reply = generate(model, tokenizer, history, max_new_tokens, temperature, on_text=_stdout)
        _stdout("\n")
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_engine.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="base checkpoint (with --adapter) or a merged/exported checkpoint; "
                                    "default with --adapter: the base the adapter names")  # fmt: skip
    ap.add_argument("--adapter", help="adapter directory (PEFT format); the base is quantized as in training")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message; the answer is streamed to stdout")
    what.add_argument("--chat", action="store_true", help="read user turns from stdin until EOF or an empty line")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    a = ap.parse_args(argv)
    quiet_loading()
    try:
        if a.max_new_tokens < 1 or a.temperature < 0:
            raise ValueError("--max-new-tokens must be at least 1 and --temperature at least 0")
        device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here")
        if a.model is None and a.adapter is None:
            raise ValueError("give --model (and --adapter for a base plus adapter)")
        model_dir = default_model.resolve(a.model) if a.model else adapter_base(a.adapter)
        model = load_trained(model_dir, a.adapter, device) if a.adapter else load_plain(model_dir, device)
        tokenizer = load_tokenizer(model_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    if a.chat:
        chat(model, tokenizer, a.max_new_tokens, a.temperature)
    else:
        generate(model, tokenizer, a.prompt, a.max_new_tokens, a.temperature, on_text=_stdout)
        _stdout("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
