"""`qlora export` (= `python -m qlora_engine.export`): an adapter merged onto the exactly
dequantized base it was trained on, streamed to a plain 16-bit checkpoint (the default), to one
GGUF file for llama.cpp / Ollama (`--format gguf`), or the adapter alone as a llama.cpp LoRA GGUF
(`--format gguf-lora`), with a fidelity report.

What --out overwrites: nothing, unless --force; with --force the directory --out (and only it) is
replaced, after the new export is complete (it is built in a temporary sibling directory); for the
GGUF formats --out is one file, replaced only when it is a GGUF file, after the new one is complete.
"""

from __future__ import annotations

from . import args

FORMATS = ("safetensors", "gguf", "gguf-lora")


def build_parser(prog: str = "qlora export"):
    from ..export import GGUF_TYPES

    p = args.parser(prog, "Merge an adapter onto the weights it was trained on (NF4, dequantized exactly) and write a "
                          "plain 16-bit Hugging Face checkpoint or a GGUF file, with a fidelity report; or write the "
                          "adapter alone as a llama.cpp LoRA GGUF.")  # fmt: skip
    p.add_argument("--model", help="the base: the 16-bit checkpoint trained on (quantized on the fly as in training), or "
                                   "its 4-bit checkpoint; a directory or hub id [the base the adapter names]")  # fmt: skip
    p.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors); required, except "
                                     "that --format gguf without it writes the base --model alone")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory, or the .gguf file for the GGUF formats (must not exist "
                                                "unless --force)")  # fmt: skip
    p.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="safetensors: merged 16-bit checkpoint directory; gguf: merged model in one GGUF file for llama.cpp / "
                        "Ollama; gguf-lora: the adapter alone in llama.cpp's LoRA format (llama-server -m base.gguf "
                        "--lora OUT) [safetensors]")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16"], help="dtype of the merged weights (safetensors) [bf16]")
    p.add_argument("--gguf-type", default=None, choices=GGUF_TYPES,
                   help="tensor types of --format gguf: bf16, f16, q8_0, q4_0 or q4_k_m (llama-quantize's per-tensor "
                        "choice) [bf16]")  # fmt: skip
    p.add_argument("--ollama", action="store_true", help="with --format gguf: also write an Ollama Modelfile beside the GGUF")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB [5GB]")
    p.add_argument("--force", action="store_true", help="replace --out (only it) if it exists, once the export is complete")
    p.add_argument("--quantize", action="store_true", help="also write the export re-quantized to NF4 in OUT/nf4 (safetensors)")
    args.add_device(p, "where quantization, merging and the report run")
    p.add_argument("--no-report", action="store_true", help="skip the fidelity report (loads the models; costs memory)")
    return p


def _check_combination(p, a) -> None:
    """Flags that belong to another format are an error, not silently ignored."""
    wrong = {"safetensors": [("--gguf-type", a.gguf_type is not None), ("--ollama", a.ollama)],
             "gguf": [("--dtype", a.dtype is not None), ("--quantize", a.quantize)],
             "gguf-lora": [("--dtype", a.dtype is not None), ("--quantize", a.quantize),
                           ("--gguf-type", a.gguf_type is not None), ("--ollama", a.ollama)]}[a.format]  # fmt: skip
    if not a.adapter and not (a.format == "gguf" and a.model):
        p.error("--adapter is required" + ("" if a.format != "gguf" else " (or --model alone, to write the base as GGUF)"))
    for flag, given in wrong:
        if given:
            hint = "--gguf-type" if flag == "--dtype" else "--format gguf" if flag in ("--gguf-type", "--ollama") else "--format safetensors"
            p.error(f"{flag} does not apply to --format {a.format} (see {hint})")


def run(argv: list[str]) -> int:
    from ..lora.peft_format import adapter_base
    from ..machine import parse_size, resolve_device
    from ..models.hub import resolve_model
    from ..progress import quiet_third_party

    p = build_parser()
    a = p.parse_args(argv)
    _check_combination(p, a)
    quiet_third_party()
    base = resolve_model(a.model) if a.model else adapter_base(a.adapter)  # --adapter is given when --model is not
    if a.format == "gguf":
        from ..export.gguf import export_gguf

        export_gguf(base, a.adapter, a.out, a.gguf_type or "bf16", a.force, resolve_device(a.device), report=not a.no_report,
                    ollama=a.ollama)  # fmt: skip
    elif a.format == "gguf-lora":
        from ..export.gguf_lora import export_gguf_lora

        export_gguf_lora(base, a.adapter, a.out, a.force)
    else:
        from ..export.merge import OUT_DTYPES, export_merged

        export_merged(base, a.adapter, a.out, OUT_DTYPES[a.dtype or "bf16"], parse_size(a.max_shard_size), a.force,
                      a.quantize, resolve_device(a.device), report=not a.no_report)  # fmt: skip
    print(a.out)
    return 0
