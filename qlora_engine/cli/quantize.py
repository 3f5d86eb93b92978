"""`qlora quantize` (= `python -m qlora_engine.quantize`): a 16-bit checkpoint (directory or hub id)
written as a bitsandbytes/transformers 4-bit checkpoint that `from_pretrained` loads."""

from __future__ import annotations

from . import args


def build_parser(prog: str = "qlora quantize"):
    p = args.parser(prog, "Write a 4-bit checkpoint in the bitsandbytes/transformers format (sharded safetensors + "
                          "index, config.json with quantization_config, tokenizer and chat template copied).")  # fmt: skip
    p.add_argument("--model", required=True, help="16-bit checkpoint: a directory or a hub id (org/name[@revision])")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--blocksize", type=int, default=64, help="first-level block size (32..4096) [64]")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type [nf4]")
    p.add_argument("--double-quant", default="true", choices=["true", "false"],
                   help="quantize the block scales too (4.127 instead of 4.5 bits/param) [true]")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_const", const="false",
                   help="the same as --double-quant false")
    args.add_device(p, "where to quantize")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB [5GB]")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only) if there are no safetensors")
    return p


def run(argv: list[str]) -> int:
    from ..export.bnb4 import quantize_checkpoint
    from ..machine import parse_size, resolve_device
    from ..models.loader import QuantSpec

    a = build_parser().parse_args(argv)
    quant = QuantSpec(blocksize=a.blocksize, quant_type=a.quant_type, double_quant=a.double_quant == "true")
    out = quantize_checkpoint(a.model, a.out, quant, resolve_device(a.device), parse_size(a.max_shard_size), a.force,
                              a.allow_pickle)  # fmt: skip
    print(out)
    return 0
