"""Generation: prompts through the chat template, greedy or sampled decoding with transformers'
`generate`, streamed text, and an interactive chat.

`generate_text()` is the function behind `qlora generate`, the sample answers a run prints, and
the answer from an export. The model is whatever the caller built: the NF4 base plus an adapter
(`lora.peft_format.load_with_adapter`), or a plain checkpoint such as an export
(`models.loader.load_plain`).

    python -m qlora_engine.generate --model BASE --adapter RUN/adapter --prompt "What is ...?"   (= qlora generate)
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

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


def generate_text(model, tokenizer, prompt_or_messages, max_new_tokens: int = 256, temperature: float = 0.0,
             on_text: Callable[[str], None] | None = None) -> str:
    """The answer to a prompt (a user message) or a list of chat messages, streamed to `on_text`
    piece by piece when given; greedy when temperature is 0."""
    _, new = generate_ids(model, tokenizer, prompt_or_messages, max_new_tokens, temperature, on_text)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def write_stdout(text: str) -> None:
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
        reply = generate_text(model, tokenizer, history, max_new_tokens, temperature, on_text=write_stdout)
        write_stdout("\n")
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
