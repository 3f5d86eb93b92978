"""`qlora export` (= `python -m qlora_engine.export`): an adapter merged onto the exactly
dequantized base it was trained on, streamed to a plain 16-bit checkpoint, with a fidelity report.

What --out overwrites: nothing, unless --force; with --force the directory --out (and only it) is
replaced, after the new export is complete (it is built in a temporary sibling directory).
"""

from __future__ import annotations

from . import args


def build_parser(prog: str = "qlora export"):
    p = args.parser(prog, "Merge an adapter onto the weights it was trained on (NF4, dequantized exactly) and write a "
                          "plain 16-bit Hugging Face checkpoint, with a fidelity report.")  # fmt: skip
    p.add_argument("--model", help="the base: the 16-bit checkpoint trained on (quantized on the fly as in training), or "
                                   "its 4-bit checkpoint; a directory or hub id [the base the adapter names]")  # fmt: skip
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="dtype of the merged weights [bf16]")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB [5GB]")
    p.add_argument("--force", action="store_true", help="replace --out (only it) if it exists, once the export is complete")
    p.add_argument("--quantize", action="store_true", help="also write the export re-quantized to NF4 in OUT/nf4")
    args.add_device(p, "where quantization, merging and the report run")
    p.add_argument("--no-report", action="store_true", help="skip the fidelity report (loads the models; costs memory)")
    return p


def run(argv: list[str]) -> int:
    from ..export.merge import OUT_DTYPES, export_merged
    from ..lora.peft_format import adapter_base
    from ..machine import parse_size, resolve_device
    from ..models.hub import resolve_model
    from ..progress import quiet_third_party

    a = build_parser().parse_args(argv)
    quiet_third_party()
    base = resolve_model(a.model) if a.model else adapter_base(a.adapter)
    export_merged(base, a.adapter, a.out, OUT_DTYPES[a.dtype], parse_size(a.max_shard_size), a.force, a.quantize,
           resolve_device(a.device), report=not a.no_report)  # fmt: skip
    print(a.out)
    return 0
