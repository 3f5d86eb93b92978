"""A GGUF export checked in llama.cpp itself (through the optional `llama-cpp-python` package,
never a dependency): next-token logits against a reference model, tokenization against the
transformers tokenizer, the chat template as llama.cpp renders it from the GGUF metadata against
transformers' `apply_chat_template`, and greedy answers. Reads GGUF files and checkpoints; writes
nothing.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..train.evaluate import sum_nll
from .report import HELDOUT_TEXT, distinct_positions, heldout_samples

# conversations whose rendering must match: with and without a system turn, and a multi-turn one
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Quenlar?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Name a river."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me a fact about lighthouses, with 2 numbers: 3.5 and 1200."}],
]  # fmt: skip


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(path: str | Path, lora: str | Path | None = None, n_ctx: int = 512, threads: int | None = None):
    """llama.cpp's model for a GGUF (plus a LoRA GGUF), keeping the logits of every position."""
    from llama_cpp import Llama

    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                 logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)  # fmt: skip


def logits(llm, ids) -> torch.Tensor:
    """[T, vocab] float32 logits llama.cpp gives for token ids (row i predicts ids[i + 1])."""
    llm.reset()
    llm.eval([int(i) for i in ids])
    return torch.from_numpy(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))


def compare(reference: list[torch.Tensor], got: list[torch.Tensor], samples: list[torch.Tensor]) -> dict:
    """Mean KL(reference ‖ got) per position, top-1 agreement, max |Δlogit| and the perplexity of
    both on the samples' next tokens, over the distinct positions of `samples`
    (`report.distinct_positions`), logits [T, V] per sample (row i predicts token i + 1)."""
    kl = agree = n = n_next = 0
    max_abs = nll = ref_nll = 0.0
    for ref, out, ids, mask in zip(reference, got, samples, distinct_positions(samples)):
        nxt = mask[:-1].nonzero().view(-1)
        a, k = sum_nll(out[:-1][nxt], ids[1:][nxt])
        b, _ = sum_nll(ref[:-1][nxt], ids[1:][nxt])
        nll, ref_nll, n_next = nll + a, ref_nll + b, n_next + k
        ref, out = ref[mask].float(), out[mask].float()
        if not ref.shape[0]:
            continue
        lp_ref, lp = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum(-1).sum(dtype=torch.float64))
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        max_abs = max(max_abs, float((ref - out).abs().max()))
        n += ref.shape[0]
    return {"mean_kl": kl / max(n, 1), "top1_agreement": agree / max(n, 1), "max_abs_logit_diff": max_abs, "positions": n,
            "ppl": math.exp(nll / max(n_next, 1)), "reference_ppl": math.exp(ref_nll / max(n_next, 1))}  # fmt: skip


@torch.no_grad()
def model_logits(model, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """A transformers model's float32 logits per sample."""
    dev = next(model.parameters()).device
    return [model(input_ids=s[None].to(dev)).logits[0].float().cpu() for s in samples]


def tokenization_texts() -> list[str]:
    """Plain texts to tokenize both ways: the bundled held-out text's paragraphs and llama.cpp's
    pre-tokenizer probe (digits, whitespace runs, emoji, CJK, apostrophes)."""
    from .gguf_vocab import PROBE

    return [p for p in HELDOUT_TEXT.read_text().split("\n\n") if p.strip()] + [PROBE]


def tokenization(llm, tokenizer, texts: list[str], special: bool = False) -> dict:
    """Whether llama.cpp tokenizes each text as transformers does (with the special tokens each
    adds by default; with `special`, texts may hold special tokens such as <|im_start|>)."""
    mismatches, tokens = [], 0
    for i, text in enumerate(texts):
        hf = tokenizer.encode(text, add_special_tokens=not special)
        ll = llm.tokenize(text.encode("utf-8"), add_bos=not special, special=special)
        tokens += len(hf)
        if hf != ll:
            at = next((j for j, (a, b) in enumerate(zip(hf, ll)) if a != b), min(len(hf), len(ll)))
            mismatches.append({"text": i, "at": at, "hf": hf[at : at + 5], "llama_cpp": ll[at : at + 5]})
    return {"texts": len(texts), "tokens": tokens, "identical": not mismatches, "mismatches": mismatches[:5]}


def _token_text(llm, token_id: int) -> str:
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""


def chat_prompts(llm, tokenizer, conversations: list[list[dict]]) -> dict:
    """The GGUF's tokenizer.chat_template rendered by llama-cpp-python's Jinja2ChatFormatter against
    transformers' apply_chat_template, conversation by conversation, and the rendered prompts
    tokenized by both."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return {"conversations": len(conversations), "identical": False, "error": "no tokenizer.chat_template in the GGUF"}
    fmt = Jinja2ChatFormatter(template=template, eos_token=_token_text(llm, llm.token_eos()),
                              bos_token=_token_text(llm, llm.token_bos()), add_generation_prompt=True)  # fmt: skip
    differ, prompts = [], []
    for i, messages in enumerate(conversations):
        ours = fmt(messages=messages).prompt
        hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(hf)
        if ours != hf:
            differ.append(i)
    toks = tokenization(llm, tokenizer, prompts, special=True)
    return {"conversations": len(conversations), "identical": not differ, "differ": differ,
            "tokens_identical": toks["identical"], "tokens": toks["tokens"]}  # fmt: skip


def greedy_answer(llm, tokenizer, question: str, max_tokens: int = 32) -> str:
    """llama.cpp's greedy answer to one user turn, prompted with the model's chat template."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
    return out["choices"][0]["text"].strip()


def check(llm, tokenizer, reference: list[torch.Tensor], samples: list[torch.Tensor], others: dict | None = None) -> dict:
    """Everything above for one loaded GGUF: logits against `reference` (and against each of
    `others`, name -> logits, under "vs"), tokenization, chat template."""
    got = [logits(llm, s) for s in samples]
    vs = {name: compare(ref, got, samples) for name, ref in (others or {}).items()}
    return {**compare(reference, got, samples), "vs": vs, "tokenization": tokenization(llm, tokenizer, tokenization_texts()),
            "chat_template": chat_prompts(llm, tokenizer, CONVERSATIONS)}  # fmt: skip


def llama_quantize(src: str | Path, dst: str | Path, gguf_type: str, threads: int | None = None) -> None:
    """`llama-quantize src dst TYPE` through llama.cpp's C API (no imatrix): the reference our
    quantized exports are measured against."""
    import ctypes

    import llama_cpp

    from .gguf import file_type

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(gguf_type)
    params.nthread = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {gguf_type}")


def gguf_fidelity(gguf_path: str | Path, base: str | Path, adapter_dir: str | Path | None, device="cpu",
                  lora: str | Path | None = None) -> dict:  # fmt: skip
    """The GGUF in llama.cpp against the model that was trained (base built as in training +
    adapter, float32 compute), on the run's held-out samples, as the safetensors export's report;
    without an adapter, against the base in transformers on the bundled held-out text."""
    from ..lora.peft_format import load_with_adapter
    from ..models.hub import load_tokenizer
    from ..models.loader import load_dense

    tokenizer = load_tokenizer(base)
    samples, source = heldout_samples(adapter_dir or base, tokenizer)
    if adapter_dir:
        model, what = load_with_adapter(base, adapter_dir, device), "trained model (float32 compute)"
    else:
        model, what = load_dense(base, device), "the base in transformers (float32 compute)"
    reference = model_logits(model.to(torch.float32).eval(), samples)
    del model
    llm = load(gguf_path, lora, n_ctx=_ctx(samples))
    try:
        result = check(llm, tokenizer, reference, samples)
    finally:
        llm.close()
    return {"reference": what, "heldout": source, **result}


def _ctx(samples: list[torch.Tensor]) -> int:
    return max(256, -(-max(len(s) for s in samples) // 64) * 64)


def format_fidelity(r: dict) -> str:
    tok, chat = r["tokenization"], r["chat_template"]
    return (f"llama.cpp vs {r['reference']} on {r['positions']} held-out positions: KL {r['mean_kl']:.2e}, top-1 "
            f"{100 * r['top1_agreement']:.2f}%; tokenization {'identical' if tok['identical'] else 'DIFFERS'} on "
            f"{tok['tokens']} tokens; chat template {'identical' if chat['identical'] else 'DIFFERS'}")  # fmt: skip
