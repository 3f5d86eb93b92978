"""`qlora generate` (= `python -m qlora_engine.generate`): stream an answer from a trained model, or
chat with it. The model is the NF4 base plus an adapter, built exactly as training built it, or a
plain checkpoint such as an export."""

from __future__ import annotations

from . import args


def build_parser(prog: str = "qlora generate"):
    p = args.parser(prog, "Stream an answer from a base + adapter (built as in training) or from an export, or chat.")
    p.add_argument("--model", help="base checkpoint (with --adapter) or a merged/exported checkpoint; a directory or hub "
                                   "id; default with --adapter: the base the adapter names")  # fmt: skip
    p.add_argument("--adapter", help="adapter directory (PEFT format); the base is quantized as in training")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message; the answer is streamed to stdout")
    what.add_argument("--chat", action="store_true", help="read user turns from stdin until EOF or an empty line")
    p.add_argument("--max-new-tokens", type=int, default=256, help="[256]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0) [0]")
    args.add_device(p)
    return p


def run(argv: list[str]) -> int:
    import torch

    from ..errors import InputError
    from ..generate import chat, generate_text, write_stdout
    from ..lora.peft_format import adapter_base, load_with_adapter
    from ..machine import resolve_device
    from ..models.hub import load_tokenizer, resolve_model
    from ..models.loader import load_plain
    from ..progress import quiet_third_party

    a = build_parser().parse_args(argv)
    quiet_third_party()
    if a.max_new_tokens < 1 or a.temperature < 0:
        raise InputError("--max-new-tokens must be at least 1 and --temperature at least 0")
    if a.model is None and a.adapter is None:
        raise InputError("give --model (and --adapter for a base plus adapter)")
    device = resolve_device(a.device)
    model_dir = resolve_model(a.model) if a.model else adapter_base(a.adapter)
    model = load_with_adapter(model_dir, a.adapter, device) if a.adapter else load_plain(model_dir, device)
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(a.seed)
    if a.chat:
        chat(model, tokenizer, a.max_new_tokens, a.temperature)
    else:
        generate_text(model, tokenizer, a.prompt, a.max_new_tokens, a.temperature, on_text=write_stdout)
        write_stdout("\n")
    return 0
