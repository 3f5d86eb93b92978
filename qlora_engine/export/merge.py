"""An adapter merged into the weights it was trained on, written as a plain 16-bit Hugging Face
checkpoint (`export`, the function behind `qlora export`).

The trained model is NF4(base) + LoRA, not base + LoRA. So every linear the engine quantized in
training is quantized again exactly as then (same block size, type and double quantization, from the
same bf16 values), dequantized exactly, `scale · B · A` added in float32, and the sum rounded once to
the output dtype. Quantized layers without an adapter are written dequantized too: that is the model
that was trained. An adapter trained on 16-bit weights (plain LoRA) is merged onto them. A 4-bit base
checkpoint is used as it is.

The export streams: one tensor of the base is read, turned into its output tensor and written into
shards planned up front, so host memory holds about one tensor, never the model. Everything is
written into a temporary directory renamed into place at the end: a failure leaves nothing behind.
With `report`, the fidelity report (`report.py`) is computed and saved in the export as
`export_report.json`; with `quantize`, the export is also written re-quantized to NF4 (`bnb4.py`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError
from ..lora import peft_format
from ..lora.layers import delta_weight, layer_kind, lora_scaling
from ..machine import fmt_bytes
from ..models.hub import load_config, resolve_model
from ..models.loader import BASE_DTYPE, QuantSpec, checkpoint_spec, empty_model, quant_state
from ..models.structure import block_linear_names, quantized_prefixes, weight_owner
from ..models.tensorfiles import (ShardedWriter, TensorEntry, atomic_directory, check_not_inside, copy_side_files,
                                  list_tensors, read_tensor)  # fmt: skip
from ..progress import Progress
from ..quant import nf4, ops

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_JSON = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
REPORT = "export_report.json"
NF4_DIR = "nf4"  # --quantize writes the re-quantized export here, inside the export


@dataclass
class Adapter:
    """A saved adapter and how its base was built in training."""

    dir: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_kind: str  # "nf4" (QLoRA) or "bf16" (plain LoRA)
    quant: QuantSpec
    recorded: bool  # whether training recorded base_kind and quant (else defaults)

    kinds: dict[str, str] = field(default_factory=dict)  # layer name -> linear / embedding / conv (set by plan_export)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "Adapter":
        cfg, weights = peft_format.read_adapter(adapter_dir)
        return cls(Path(adapter_dir), cfg, weights, *peft_format.provenance(adapter_dir))

    def delta(self, name: str, device) -> torch.Tensor:
        """scale · B·A in float32, shaped like the base weight, as the LoRA layer's `delta_weight`."""
        A, B = self.weights[name]
        scaling = lora_scaling(peft_format.adapter_alpha(self.config, name), A.shape[0], bool(self.config.get("use_rslora")))
        return delta_weight(self.kinds.get(name, "linear"), A.to(device), B.to(device), scaling)


@dataclass
class _Item:
    """One output tensor and where it comes from.

    kind: "copy" (cast to the output dtype), "nf4" (16-bit weight quantized as in training, then
    dequantized), "prequant" (4-bit weight of the base, dequantized), "merge16" (16-bit weight, no
    quantization). The last three add the adapter's update when `adapted`.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    source: str
    adapted: bool = False


@dataclass
class Plan:
    base: Path
    items: list[_Item]
    config: dict  # config.json of the export
    quantized: list[str]  # layers that were NF4 in training (re-quantized by --quantize)
    notes: list[str] = field(default_factory=list)


def plan_export(base_dir: str | Path, adapter: Adapter, dtype: torch.dtype) -> Plan:
    """Every output tensor, in the base's file order, from the headers alone; one-line errors for
    an adapter that does not fit this base."""
    base = Path(base_dir)
    hf_config = load_config(base)
    raw_config = json.loads((base / "config.json").read_text())
    entries = list_tensors(base)
    prequant = quantized_prefixes(entries)
    meta = empty_model(hf_config, BASE_DTYPE)  # no storage: names and shapes only
    peft_format.check_adapter_fits(meta, adapter.weights, adapter.dir)
    adapter.kinds = {name: layer_kind(meta.get_submodule(name)) for name in adapter.weights}

    if adapter.base_kind == "bf16":
        if prequant:
            raise InputError(f"{adapter.dir} was trained on 16-bit weights (plain LoRA) but {base} is a 4-bit checkpoint: "
                             f"give the 16-bit checkpoint")  # fmt: skip
        quantized: set[str] = set()
    elif prequant:
        quantized = set(prequant)
        if adapter.recorded:  # the spec training used must be the one of the checkpoint's bytes
            got = checkpoint_spec(entries, sorted(prequant)[0])
            if got != adapter.quant:
                raise InputError(f"{base} is quantized with {got} but {adapter.dir} was trained with {adapter.quant}: "
                                 f"export onto the 16-bit checkpoint instead")  # fmt: skip
    else:
        quantized = set(block_linear_names(meta))

    adapted = set(adapter.weights)
    items, notes, done = [], [], set()
    for e in sorted(entries.values(), key=lambda e: (str(e.file), e.offset)):
        owner, part = weight_owner(e.name)
        if owner in prequant:
            if part != "weight":
                continue  # absmax, quant_map, ...: folded into the dequantized weight
            shape = tuple(quant_state(entries, owner)["shape"])
            items.append(_Item(e.name, dtype, shape, "prequant", owner, owner in adapted))
        elif part == "weight" and owner in quantized:
            items.append(_Item(e.name, dtype, e.shape, "nf4", e.name, owner in adapted))
        elif part == "weight" and owner in adapted:
            items.append(_Item(e.name, dtype, e.shape, "merge16", e.name, True))
        else:
            items.append(_Item(e.name, dtype if e.dtype.is_floating_point else e.dtype, e.shape, "copy", e.name))
        if part == "weight":
            done.add(owner)

    config = dict(raw_config)
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = DTYPE_JSON[dtype]
    for name in sorted(adapted - done):
        # an adapted layer with no weight of its own: the output embedding tied to the input one
        out_emb, in_emb = meta.get_output_embeddings(), meta.get_input_embeddings()
        if out_emb is None or meta.get_submodule(name) is not out_emb or f"{name}.weight" in entries:
            raise InputError(f"{base}: the checkpoint has no {name}.weight for the adapter layer {name}")
        src = next(n for n, m in meta.named_modules() if m is in_emb) + ".weight"
        items.append(_Item(f"{name}.weight", dtype, tuple(out_emb.weight.shape), "merge16", src, True))
        config["tie_word_embeddings"] = False
        notes.append(f"{name} is adapted, so it is no longer tied to the input embeddings")
    return Plan(base, items, config, sorted(quantized), notes)


def _cast(t: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 20) -> torch.Tensor:
    """`t.to(dtype)`; between dtypes of one size (bf16 -> fp16), in place, chunk by chunk, so the
    largest tensor (often the embeddings) is not held twice."""
    if t.dtype == dtype or t.element_size() != torch.empty((), dtype=dtype).element_size():
        return t.to(dtype)
    src, dst = t.view(-1), t.view(-1).view(dtype)
    for i in range(0, src.numel(), chunk):
        dst[i : i + chunk] = src[i : i + chunk].to(dtype)  # converted before its bytes are overwritten
    return t.view(dtype)


def _merged_tensor(item: _Item, adapter: Adapter, entries: dict[str, TensorEntry], device) -> torch.Tensor:
    """The output tensor of one item (on the CPU)."""
    if item.kind == "copy":
        t = read_tensor(entries[item.source])
        if t.is_floating_point():
            t = _cast(t.to(BASE_DTYPE), item.dtype)  # the values the trained model held, then the output dtype
        return t
    if item.kind == "prequant":
        parts = {n[len(item.source) + 1 :]: read_tensor(e) for n, e in entries.items() if n.startswith(item.source + ".weight")}
        state = nf4.QuantState.from_state_dict(parts, "weight").to(device)
        w = nf4.dequantize_4bit(parts["weight"].to(device), state, torch.float32)
    else:
        w = read_tensor(entries[item.source]).to(device=device, dtype=BASE_DTYPE)  # training quantized from bf16
        if item.kind == "nf4":
            q = adapter.quant
            packed, state = ops.quantize_weight(w, q.blocksize, q.quant_type, q.double_quant)
            w = nf4.dequantize_4bit(packed, state, torch.float32)
            del packed
        else:
            w = w.float()
    if item.adapted:
        w += adapter.delta(item.name[: -len(".weight")], device)
    return w.to(item.dtype).cpu()


def merged_tensors(plan: Plan, adapter: Adapter, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, output tensor on the CPU) for every planned item, in plan order, one at a time."""
    entries = list_tensors(plan.base)
    for item in plan.items:
        yield item.name, _merged_tensor(item, adapter, entries, device)


def write_export(plan: Plan, adapter: Adapter, out_dir: Path, max_shard_bytes: int, device="cpu") -> int:
    """Stream every planned tensor into `out_dir` (shards + index); returns the bytes written."""
    writer = ShardedWriter(out_dir, [(i.name, i.dtype, i.shape) for i in plan.items], max_shard_bytes)
    bar = Progress(len(plan.items), f"exporting to {out_dir.name.lstrip('.').split('.tmp')[0]}", "tensors")
    for name, tensor in merged_tensors(plan, adapter, device):
        writer.write(name, tensor)
        bar.update()
    bar.close()
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    copy_side_files(plan.base, out_dir)
    return writer.total_bytes


def export_merged(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
           max_shard_bytes: int = 5 * 10**9, force: bool = False, quantize: bool = False, device="cpu",
           report: bool = True, log=print) -> dict:
    """Merge `adapter_dir` onto `base_dir` into `out` (atomically); with `report`, also compute the
    fidelity report and save it in the export. Returns the report (or a summary without it)."""
    base, out, device = resolve_model(base_dir), Path(out), torch.device(device)
    check_not_inside(out, {"base model": base, "adapter": Path(adapter_dir)})
    adapter = Adapter.read(adapter_dir)
    plan = plan_export(base, adapter, dtype)
    info = {"base": str(base), "adapter": str(adapter.dir), "out": str(out), "dtype": DTYPE_JSON[dtype],
            "base_kind": adapter.base_kind, "quant": adapter.quant.__dict__ if adapter.base_kind == "nf4" else None}  # fmt: skip
    with atomic_directory(out, force) as tmp:
        t0 = time.perf_counter()
        info["bytes"] = write_export(plan, adapter, tmp, max_shard_bytes, device)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        if quantize:
            from .bnb4 import write_requantized

            write_requantized(tmp, tmp / NF4_DIR, plan.quantized, adapter.quant, dtype, max_shard_bytes, device)
        for note in plan.notes:
            log(f"note: {note}")
        log(f"exported {len(plan.items)} tensors ({fmt_bytes(info['bytes'])}, {DTYPE_JSON[dtype]}) in {info['seconds']:.1f} s")
        if report:
            from .report import fidelity_report, format_report

            rep = fidelity_report(base, adapter.dir, tmp, dtype, tmp / NF4_DIR if quantize else None, device)
            info.update(rep)
            (tmp / REPORT).write_text(json.dumps(info, indent=2) + "\n")
            log(format_report(info))
    return info
