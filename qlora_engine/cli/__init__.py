"""The `qlora` command: one entry point, a subcommand each for finetune, plan, quantize, export,
generate and ext. Argument parsing and the one error path (`errors.run`) live here; each
subcommand is a thin shell over functions a user can call from Python.

    qlora finetune --config run.yaml        (also: python -m qlora_engine finetune ..., scripts/finetune.py)
    qlora plan --model llama-3.1-8b --gpu 4090
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS = {
    "finetune": "train a LoRA adapter on a 4-bit base (no arguments: the demo)",
    "plan": "the peak-memory plan of a run, and the largest batch / sequence / rank that fits",
    "quantize": "write a bitsandbytes/transformers 4-bit checkpoint",
    "export": "merge an adapter onto its exactly dequantized base and write a 16-bit checkpoint",
    "generate": "answer a prompt (or chat) with a base + adapter or an export",
    "serve": "serve a base and many LoRA adapters over an OpenAI-compatible API, batched across adapters",
    "ext": "whether the CUDA kernel library was built and loaded, and why not",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: qlora COMMAND [flags]   (qlora COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    from . import args, errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] == "--version":
        from .. import __version__

        print(f"qlora_engine {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1) if argv else []
        what = f"unknown command {argv[0]!r}" + (f"; did you mean {near[0]}?" if near else "") if argv else "no command"
        print(f"error: {what} (commands: {', '.join(COMMANDS)}; see `qlora --help`)", file=sys.stderr)
        return 2
    cmd = importlib.import_module(f".{argv[0]}", __name__)
    return errors.run(cmd.run, args.normalize(argv[1:]))
