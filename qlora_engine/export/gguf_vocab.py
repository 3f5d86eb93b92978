"""A checkpoint's tokenizer as GGUF metadata, the way llama.cpp expects it.

Two tokenizer kinds, the ones of the families the engine trains:
- byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM/SmolLM2, Qwen2/2.5, Llama 3, Mistral
  Nemo): tokens and types from the transformers tokenizer, merges from `gguf.SpecialVocab`, and
  the pre-tokenizer name llama.cpp dispatches on (`tokenizer.ggml.pre`), found as llama.cpp's
  converter finds it: by hashing the token ids of a probe text;
- SentencePiece-style BPE with byte fallback (`"llama"`: Llama 2, Mistral 7B): tokens, scores and
  types from `gguf.LlamaHfVocab`.
Special token ids, the chat template and the add-BOS/EOS flags come from `gguf.SpecialVocab`; the
flags are then set to what the transformers tokenizer actually does, so that llama.cpp adds the
same tokens. Reads the checkpoint's tokenizer files; writes only into the GGUFWriter it is given.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from ..errors import InputError

# llama.cpp's converter probe text (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids tell
# pre-tokenizers apart (digits, spaces, emoji, CJK, apostrophes).
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
         "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
         "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
         "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")  # fmt: skip
# sha256(str(token ids of PROBE)) -> llama.cpp pre-tokenizer, for the families trained here
# (hashes from llama.cpp's convert_hf_to_gguf.py table, reference model in the comment)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B (Qwen2/2.5 share it)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
}
# added tokens that look special are control tokens even when not flagged special (llama.cpp's rule)
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_special(token: str) -> bool:
    return (token in _SPECIAL_LOOKING or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or token.startswith("<unused"))  # fmt: skip


def tokenizer_kind(model_dir: Path) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (BPE with byte fallback), from tokenizer.json; a one-line
    error for anything else."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no tokenizer.json; GGUF needs the tokenizer: copy tokenizer.json (and "
                         "tokenizer_config.json) from the original checkpoint")  # fmt: skip
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise InputError(f"{path} is not a tokenizers JSON file; restore it from the original checkpoint") from None
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")]):
        return "gpt2"
    raise InputError(f"{path}: a {model.get('type')} tokenizer without byte-level pre-tokenization or byte fallback; "
                     "GGUF export supports the byte-level BPE (SmolLM, Qwen2, Llama 3) and SentencePiece-style BPE "
                     "(Llama 2, Mistral) tokenizers")  # fmt: skip


# When the hash is not in the table (the ids also depend on the vocabulary), the pre-tokenizer itself
# decides where it is one llama.cpp implements with the same regex: GPT-2's, or Qwen2's (which
# transformers 5 imposes on any tokenizer of a qwen2 model).
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_by_structure(tokenizer) -> str | None:
    try:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    except (AttributeError, ValueError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == QWEN2_REGEX and parts[0].get("behavior") == "Isolated"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):  # fmt: skip
        return "qwen2"
    return None


def pre_tokenizer(tokenizer, model_dir: Path) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenization, as llama.cpp's converter finds it
    (hash of the probe's ids), else from the pre-tokenizer's definition; or a one-line error."""
    digest = sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest) or _pre_by_structure(tokenizer)
    if name is None:
        raise InputError(f"{model_dir}: llama.cpp has no pre-tokenizer known for this tokenizer (probe hash {digest[:16]}…); "
                         "only SmolLM, Qwen2, Llama 3, Mistral Nemo and GPT-2 style byte-level tokenizers are mapped")  # fmt: skip
    return name


def _bpe_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts (byte-level strings, e.g. 'Ġthe') and llama.cpp token types, id by id."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            info = decoder[i]
            if not info.normalized:  # stored as typed, not byte-level encoded: store what it encodes to
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if info.special or _looks_special(tok):
                types.append(TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(tok)
    return tokens, [int(t) for t in types]


def _spm_tokens(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    from gguf import LlamaHfVocab, TokenType

    tokens, scores, types = [], [], []
    for text, score, kind in LlamaHfVocab(Path(model_dir)).all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    for i in range(len(tokens), n_vocab):  # rows the model has beyond the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return tokens, scores, types


def add_vocab(writer, model_dir: str | Path, n_vocab: int) -> dict:
    """Write the tokenizer of `model_dir` into `writer` for a model with `n_vocab` embedding rows;
    returns a summary (model, pre, tokens, merges, special ids, add_bos, add_eos, chat template)."""
    from gguf import SpecialVocab

    from ..models.hub import load_tokenizer

    model_dir = Path(model_dir)
    kind = tokenizer_kind(model_dir)
    tok = load_tokenizer(model_dir)
    if len(tok.get_vocab()) > n_vocab:
        raise InputError(f"{model_dir}: the tokenizer has {len(tok.get_vocab())} tokens but the model only {n_vocab} "
                         "embedding rows; the tokenizer is not this model's")  # fmt: skip
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = pre_tokenizer(tok, model_dir)
        tokens, types = _bpe_tokens(tok, n_vocab)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        pre = "default"
        tokens, scores, types = _spm_tokens(model_dir, n_vocab)
        if len(tokens) != n_vocab:
            raise InputError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the model {n_vocab} embedding rows")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)

    special = SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    # llama.cpp adds BOS/EOS by these flags: set them to what the transformers tokenizer does
    probe = tok.encode("a")
    add_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    add_eos = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)
    cfg_path = model_dir / "tokenizer_config.json"
    if kind == "llama" and cfg_path.is_file():
        prefix = json.loads(cfg_path.read_text(encoding="utf-8")).get("add_prefix_space")
        if isinstance(prefix, bool):
            writer.add_add_space_prefix(prefix)
    return {"model": kind, "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_ids": dict(special.special_token_ids), "add_bos": add_bos, "add_eos": add_eos,
            "chat_template": isinstance(special.chat_template, str) and bool(special.chat_template)}  # fmt: skip
