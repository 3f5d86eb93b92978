"""`python -m qlora_engine.export`: an adapter merged into the weights it was trained on, written as
a plain 16-bit Hugging Face checkpoint, with a fidelity report.

    python -m qlora_engine.export --model BASE --adapter RUN/adapter --out RUN/merged [--dtype bf16|fp16]
        [--max-shard-size 5GB] [--force] [--quantize] [--device cpu|cuda] [--no-report]

The trained model is NF4(base) + LoRA, not base + LoRA. So every linear the engine quantized in
training is quantized again exactly as then (same block size, type and double quantization, from the
same bf16 values), dequantized exactly, `scale · B · A` added in float32, and the sum rounded once to
the output dtype. Quantized layers without an adapter are written dequantized too: that is the model
that was trained. An adapter trained on 16-bit weights (plain LoRA) is merged onto them. A 4-bit base
checkpoint is used as it is.

The export streams: one tensor of the base is read, turned into its output tensor and written into
shards planned up front, so host memory holds about one tensor, never the model. Everything is
written into a temporary directory renamed into place at the end: a failure leaves nothing behind.

The report (`export_report.json` in the export, and a table) compares the trained model (engine
loader + adapter) with the export loaded by plain transformers, and, for contrast, with the adapter
merged into the original 16-bit weights and (with --quantize) with the export quantized to NF4 again
(`OUT/nf4`, bitsandbytes format). All run in float32 so that only their weights differ; the trained
model run in bf16 shows how much bf16 arithmetic alone moves the logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import default_model, lora, loader, nf4, ops
from .linear import lora_scaling
from .generate import (TRAIN_DTYPE, adapter_base, generate, is_4bit_checkpoint, load_tokenizer, load_trained, provenance,
                       quiet_loading)  # fmt: skip
from .loader import QuantSpec
from .sizes import fmt_bytes, parse_size
from .tensorfiles import ShardedWriter, TensorEntry, atomic_directory, copy_side_files, list_tensors, read_tensor

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_JSON = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
REPORT = "export_report.json"
NF4_DIR = "nf4"  # --quantize writes the re-quantized export here, inside the export
HELDOUT_IDS = lora.HELDOUT
HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout.txt"


@dataclass
class Adapter:
    """A saved adapter and how its base was built in training."""

    dir: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_kind: str  # "nf4" (QLoRA) or "bf16" (plain LoRA)
    quant: QuantSpec
    recorded: bool  # whether training recorded base_kind and quant (else defaults)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "Adapter":
        cfg, weights = lora.read_adapter(adapter_dir)
        return cls(Path(adapter_dir), cfg, weights, *provenance(adapter_dir))

    def delta(self, name: str, device) -> torch.Tensor:
        """scale · B · A in float32 [out, in], as `LoraLinear.delta_weight` after `lora.load_adapter`."""
        A, B = self.weights[name]
        r = A.shape[0]
        alpha = self.config.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], self.config["lora_alpha"])
        scaling = lora_scaling(alpha, r, bool(self.config.get("use_rslora")))
        return scaling * (B.to(device).float() @ A.to(device).float())


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


def _quant_meta(entries: dict[str, TensorEntry], prefix: str) -> dict:
    blob = next(e for n, e in entries.items() if n.startswith(f"{prefix}.weight.quant_state.bitsandbytes__"))
    return json.loads(bytes(read_tensor(blob).numpy().tobytes()))


def plan_export(base_dir: str | Path, adapter: Adapter, dtype: torch.dtype) -> Plan:
    """Every output tensor, in the base's file order, from the headers alone; one-line errors for
    an adapter that does not fit this base."""
    base = Path(base_dir)
    hf_config = loader.load_config(base)
    raw_config = json.loads((base / "config.json").read_text())
    entries = list_tensors(base)
    prequant = loader.quantized_prefixes(entries)
    meta = loader.empty_model(hf_config, TRAIN_DTYPE)  # no storage: names and shapes only
    lora.check_adapter_fits(meta, adapter.weights, adapter.dir)

    if adapter.base_kind == "bf16":
        if prequant:
            raise ValueError(f"{adapter.dir} was trained on 16-bit weights (plain LoRA) but {base} is a 4-bit checkpoint: "
                             f"give the 16-bit checkpoint")  # fmt: skip
        quantized: set[str] = set()
    elif prequant:
        quantized = set(prequant)
        if adapter.recorded:  # the spec training used must be the one of the checkpoint's bytes
            q = _quant_meta(entries, sorted(prequant)[0])
            got = QuantSpec(int(q["blocksize"]), q["quant_type"], "nested_offset" in q)
            if got != adapter.quant:
                raise ValueError(f"{base} is quantized with {got} but {adapter.dir} was trained with {adapter.quant}: "
                                 f"export onto the 16-bit checkpoint instead")  # fmt: skip
    else:
        quantized = set(loader.block_linear_names(meta))

    adapted = set(adapter.weights)
    items, notes, done = [], [], set()
    for e in sorted(entries.values(), key=lambda e: (str(e.file), e.offset)):
        owner, part = loader.weight_owner(e.name)
        if owner in prequant:
            if part != "weight":
                continue  # absmax, quant_map, ...: folded into the dequantized weight
            shape = tuple(_quant_meta(entries, owner)["shape"])
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
            raise ValueError(f"{base}: the checkpoint has no {name}.weight for the adapter layer {name}")
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
            t = _cast(t.to(TRAIN_DTYPE), item.dtype)  # the values the trained model held, then the output dtype
        return t
    if item.kind == "prequant":
        parts = {n[len(item.source) + 1 :]: read_tensor(e) for n, e in entries.items() if n.startswith(item.source + ".weight")}
        state = nf4.QuantState.from_state_dict(parts, "weight").to(device)
        w = nf4.dequantize_4bit(parts["weight"].to(device), state, torch.float32)
    else:
        w = read_tensor(entries[item.source]).to(device=device, dtype=TRAIN_DTYPE)  # training quantized from bf16
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


def write_export(plan: Plan, adapter: Adapter, out_dir: Path, max_shard_bytes: int, device="cpu") -> int:
    """Stream every planned tensor into `out_dir` (shards + index); returns the bytes written."""
    entries = list_tensors(plan.base)
    writer = ShardedWriter(out_dir, [(i.name, i.dtype, i.shape) for i in plan.items], max_shard_bytes)
    for item in plan.items:
        writer.write(item.name, _merged_tensor(item, adapter, entries, device))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    copy_side_files(plan.base, out_dir)
    return writer.total_bytes


def write_requantized(export_dir: Path, out_dir: Path, quantized: list[str], quant: QuantSpec, dtype: torch.dtype,
                      max_shard_bytes: int, device="cpu") -> None:
    """The export quantized to NF4 in the bitsandbytes layout (what `qlora_engine.quantize` writes), streamed.

    The quant-state JSON holds the double-quant offset, whose printed length is known only after
    quantizing, and shard headers come first: so one pass plans (quantizing each weight and keeping
    only the sizes), a second quantizes again and writes.
    """
    from .quantize import quantization_config

    todo = set(quantized)
    entries = sorted(list_tensors(export_dir).values(), key=lambda e: (str(e.file), e.offset))

    def parts(e: TensorEntry):
        owner, part = loader.weight_owner(e.name)
        if part != "weight" or owner not in todo:
            return [(e.name, read_tensor(e))]
        packed, state = ops.quantize_weight(read_tensor(e).to(device), quant.blocksize, quant.quant_type, quant.double_quant)
        return [(e.name, packed)] + [(f"{owner}.{k}", t) for k, t in state.state_dict("weight").items()]

    specs = []
    for e in entries:
        if loader.weight_owner(e.name)[0] in todo:
            specs += [(n, t.dtype, tuple(t.shape)) for n, t in parts(e)]
        else:
            specs.append((e.name, e.dtype, e.shape))
    out_dir.mkdir()
    writer = ShardedWriter(out_dir, specs, max_shard_bytes)
    for e in entries:
        for n, t in parts(e):
            writer.write(n, t.cpu())
    writer.close()
    config = json.loads((export_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(export_dir, out_dir)


def export(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
           max_shard_bytes: int = 5 * 10**9, force: bool = False, quantize: bool = False, device="cpu",
           report: bool = True, log=print) -> dict:
    """Merge `adapter_dir` onto `base_dir` into `out` (atomically); with `report`, also compute the
    fidelity report and save it in the export. Returns the report (or a summary without it)."""
    base, out, device = Path(base_dir), Path(out), torch.device(device)
    adapter = Adapter.read(adapter_dir)
    plan = plan_export(base, adapter, dtype)
    info = {"base": str(base), "adapter": str(adapter.dir), "out": str(out), "dtype": DTYPE_JSON[dtype],
            "base_kind": adapter.base_kind, "quant": adapter.quant.__dict__ if adapter.base_kind == "nf4" else None}  # fmt: skip
    with atomic_directory(out, force) as tmp:
        t0 = time.perf_counter()
        info["bytes"] = write_export(plan, adapter, tmp, max_shard_bytes, device)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        if quantize:
            write_requantized(tmp, tmp / NF4_DIR, plan.quantized, adapter.quant, dtype, max_shard_bytes, device)
        for note in plan.notes:
            log(f"note: {note}")
        log(f"exported {len(plan.items)} tensors ({fmt_bytes(info['bytes'])}, {DTYPE_JSON[dtype]}) in {info['seconds']:.1f} s")
        if report:
            rep = fidelity_report(base, adapter.dir, tmp, dtype, tmp / NF4_DIR if quantize else None, device)
            info.update(rep)
            (tmp / REPORT).write_text(json.dumps(info, indent=2) + "\n")
            log(format_report(info))
    return info


# ---------------------------------------------------------------------------------------------- report


def heldout_samples(adapter_dir: str | Path, tokenizer, window: int = 128) -> tuple[list[torch.Tensor], str]:
    """Token-id sequences to compare models on: the run's own held-out samples (`heldout_ids.json`,
    written by training) when present, else the bundled English text cut into windows."""
    from .perplexity import token_windows

    path = Path(adapter_dir) / HELDOUT_IDS
    if path.exists():
        samples = [torch.tensor(s, dtype=torch.long) for s in json.loads(path.read_text())["samples"] if len(s) >= 2]
        if samples:
            return samples, f"{path} ({len(samples)} held-out samples of the run)"
    if tokenizer is None:
        raise ValueError(f"no held-out text to compare on: {adapter_dir} has no {HELDOUT_IDS} and the base has no tokenizer "
                         f"(pass --no-report)")  # fmt: skip
    windows = token_windows(tokenizer, HELDOUT_TEXT.read_text(), window)
    return list(windows), f"{HELDOUT_TEXT.name} ({windows.shape[0]} windows of {window} tokens)"


def distinct_positions(samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample, a bool mask of the positions whose context (the prefix up to and including the
    token) no earlier sample had. Chat samples share their system prompt and template: counting it
    once per sample would weigh the report toward those few contexts (a near-tie there would show
    as one flip per sample)."""
    trie: dict[tuple[int, int], int] = {}  # (node, token) -> node; node 0 is the empty prefix
    masks = []
    for ids in samples:
        node, mask = 0, torch.zeros(len(ids), dtype=torch.bool)
        for i, tok in enumerate(ids.tolist()):
            nxt = trie.get((node, tok))
            if nxt is None:
                nxt = trie[(node, tok)] = len(trie) + 1
                mask[i] = True
            node = nxt
        masks.append(mask)
    return masks


class _Compare:
    """Running sums of how far one model's logits are from the reference's, over the positions given."""

    def __init__(self):
        self.max_abs = 0.0
        self.sum_abs = self.kl = self.agree = self.nll = 0.0
        self.n_logits = self.n_pos = self.n_next = 0

    def add(self, ref: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """ref, logits [T, V]; ids [T]; mask [T]: the positions to count (position i predicts ids[i + 1])."""
        nxt = mask[:-1].nonzero().view(-1)
        lp = F.log_softmax(logits[:-1][nxt].float(), -1)
        self.nll += float(-lp.gather(1, ids[1:][nxt, None]).sum(dtype=torch.float64))
        self.n_next += nxt.numel()
        ref, logits = ref[mask], logits[mask].float()
        if not ref.shape[0]:
            return
        diff = (logits - ref).abs()
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum(dtype=torch.float64))
        self.n_logits += diff.numel()
        lp_ref, lp = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
        self.kl += float((lp_ref.exp() * (lp_ref - lp)).sum(-1).sum(dtype=torch.float64))
        self.agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        self.n_pos += ref.shape[0]

    def row(self, name: str, reference: bool = False) -> dict:
        ppl = math.exp(self.nll / max(self.n_next, 1))
        if reference:
            return {"model": name, "ppl": ppl}
        return {"model": name, "max_abs_logit_diff": self.max_abs, "mean_abs_logit_diff": self.sum_abs / max(self.n_logits, 1),
                "mean_kl": self.kl / max(self.n_pos, 1), "top1_agreement": self.agree / max(self.n_pos, 1), "ppl": ppl}  # fmt: skip


def merged_into_original(base_dir: str | Path, trained: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The adapter of `trained` merged into the ORIGINAL 16-bit weights, rounded to `dtype`, in
    memory: the naive export, for contrast."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=TRAIN_DTYPE).eval()
    with torch.no_grad():
        for name, layer in lora.lora_layers(trained).items():
            lin = model.get_submodule(name)
            lin.weight.data = (lin.weight.float() + layer.delta_weight().to(lin.weight.device)).to(dtype)
    return model.to(dtype)


@torch.no_grad()
def fidelity_report(base_dir: str | Path, adapter_dir: str | Path, export_dir: str | Path, dtype: torch.dtype | None = None,
                    nf4_dir: str | Path | None = None, device="cpu", original: bool = True, samples=None,
                    compute_dtype: torch.dtype = torch.float32) -> dict:
    """How close the export is to the model that was trained, on held-out text.

    Reference: the trained model (base built as in training + adapter, eval mode), run in
    `compute_dtype`. Float32 by default: then every model below computes exactly with its own
    weights, and the differences are those of the weights alone, not of bf16 arithmetic, which on
    its own moves the logits more than one rounding of the merged weights does. The trained model
    run in bf16 is reported as that noise floor. Compared with the reference: the export (loaded by
    plain transformers); the adapter merged into the original 16-bit weights (when the base is a
    16-bit checkpoint and the adapter was trained on NF4); the re-quantized export (`nf4_dir`, engine
    loader). Per model, over the distinct positions of the held-out samples (`distinct_positions`):
    max and mean |logit difference|, mean KL(trained || model) per position (float32 log-softmax),
    top-1 agreement, perplexity. Each row has a `key`: trained, trained_bf16, export, original, nf4.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    adapter = Adapter.read(adapter_dir)
    dtype = dtype or TRAIN_DTYPE
    cd = DTYPE_JSON.get(compute_dtype, "float32")
    as_trained = load_trained(base_dir, adapter_dir, device)  # bf16, as in training
    trained = copy.deepcopy(as_trained).to(compute_dtype)
    models = {}  # key -> (row label, model)
    if compute_dtype != TRAIN_DTYPE:
        models["trained_bf16"] = ("trained model, bf16 compute (noise floor)", as_trained)
    models["export"] = (f"export ({DTYPE_JSON[dtype]} weights, transformers)",
                        AutoModelForCausalLM.from_pretrained(export_dir, dtype=compute_dtype).to(device).eval())  # fmt: skip
    if original and adapter.base_kind == "nf4" and not is_4bit_checkpoint(base_dir):
        naive = merged_into_original(base_dir, as_trained, dtype).to(device=device, dtype=compute_dtype)
        models["original"] = (f"merged into the original weights ({DTYPE_JSON[dtype]})", naive)
    if nf4_dir is not None:
        models["nf4"] = ("export re-quantized to NF4 (engine loader)", loader.load_model(nf4_dir, device, compute_dtype).eval())
    if samples is None:
        has_tokenizer = any((Path(export_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        samples, source = heldout_samples(adapter_dir, load_tokenizer(export_dir) if has_tokenizer else None)
    else:
        source = "given samples"
    vocab = trained.get_input_embeddings().num_embeddings
    if any(int(s.max()) >= vocab or int(s.min()) < 0 for s in samples):
        raise ValueError(f"held-out token ids fall outside this model's vocabulary of {vocab}: were they made with another tokenizer?")
    ref_stats, stats = _Compare(), {k: _Compare() for k in models}
    for ids, mask in zip(samples, distinct_positions(samples)):
        if not mask.any():
            continue  # a repeat of an earlier sample
        ids, mask = ids.to(device), mask.to(device)
        ref = trained(input_ids=ids[None]).logits[0].float()
        ref_stats.add(ref, ref, ids, mask)
        for key, (_, m) in models.items():
            stats[key].add(ref, m(input_ids=ids[None]).logits[0], ids, mask)
    base_name = "NF4 base" if adapter.base_kind == "nf4" else "bf16 base"
    rows = [{"key": "trained", **ref_stats.row(f"trained model (engine: {base_name} + adapter), reference", True)}]
    rows += [{"key": k, **stats[k].row(label)} for k, (label, _) in models.items()]
    heldout = {"source": source, "samples": len(samples), "tokens": sum(len(t) for t in samples), "positions": ref_stats.n_pos}
    return {"heldout": heldout, "compute_dtype": cd, "rows": rows}


def report_rows(report: dict) -> dict[str, dict]:
    """The report's rows by key (trained, trained_bf16, export, original, nf4)."""
    return {r["key"]: r for r in report["rows"]}


def format_report(report: dict) -> str:
    """The report as a fixed-width table."""
    h = report["heldout"]
    lines = [f"fidelity on {h['positions']} distinct positions ({h['tokens']} tokens) of held-out text, {report['compute_dtype']} "
             f"compute: {h['source']}",
             f"{'model':<52} {'max|Δlogit|':>11} {'mean|Δlogit|':>12} {'KL(trained‖·)':>13} {'top-1':>8} {'ppl':>8}"]  # fmt: skip
    for r in report["rows"]:
        if "mean_kl" not in r:
            lines.append(f"{r['model']:<52} {'—':>11} {'—':>12} {'—':>13} {'—':>8} {r['ppl']:>8.3f}")
        else:
            lines.append(f"{r['model']:<52} {r['max_abs_logit_diff']:>11.4f} {r['mean_abs_logit_diff']:>12.5f} "
                         f"{r['mean_kl']:>13.2e} {100 * r['top1_agreement']:>7.2f}% {r['ppl']:>8.3f}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- after training


def export_after_training(cfg, result, out=print) -> dict:
    """The finetune command's `export: true`: merge the run's adapter onto its base into
    `output_dir/merged` (replacing a previous one), print a short fidelity summary, and answer
    `cfg.sample_prompt` with the exported model loaded by plain transformers (streamed to stdout)."""
    from transformers import AutoModelForCausalLM

    from .train import resolve_device

    device = resolve_device(cfg.device)
    adapter_dir = Path(result.adapter_dir)
    base = adapter_base(adapter_dir)
    dest = Path(cfg.output_dir) / "merged"
    info = export(base, adapter_dir, dest, force=True, device=device, log=lambda s: None)
    rows = report_rows(info)
    exp, orig, floor = rows["export"], rows.get("original"), rows.get("trained_bf16")
    line = (f"export: {dest} ({info['dtype']}, {fmt_bytes(info['bytes'])}); against the trained model on "
            f"{info['heldout']['positions']} held-out positions ({info['compute_dtype']} compute): KL {exp['mean_kl']:.1e}, "
            f"top-1 {100 * exp['top1_agreement']:.1f}%, ppl {exp['ppl']:.3f} (trained {rows['trained']['ppl']:.3f})")  # fmt: skip
    if orig:
        line += f"; merged into the original weights instead: KL {orig['mean_kl']:.1e}, top-1 {100 * orig['top1_agreement']:.1f}%"
    if floor:
        line += f"; the trained model itself in bf16: KL {floor['mean_kl']:.1e}"
    out(line)
    if cfg.sample_prompt:
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=OUT_DTYPES["bf16"]).to(device)
        out(f"exported model: Q: {cfg.sample_prompt}")
        sys.stdout.write("                A: ")
        info["answer"] = generate(model, load_tokenizer(dest), cfg.sample_prompt, cfg.sample_max_new_tokens,
                                  on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))  # fmt: skip
        sys.stdout.write("\n")
        sys.stdout.flush()
    return info


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_engine.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the base: the 16-bit checkpoint trained on (quantized on the fly as in "
                                                   "training), or its 4-bit checkpoint")  # fmt: skip
    ap.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(OUT_DTYPES), help="dtype of the merged weights")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--quantize", action="store_true", help=f"also write the export re-quantized to NF4 in OUT/{NF4_DIR}")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where quantization, merging and the report run")
    ap.add_argument("--no-report", action="store_true", help="skip the fidelity report (loads the models; costs memory)")
    a = ap.parse_args(argv)
    quiet_loading()
    out = Path(a.out)
    try:
        if a.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here")
        export(default_model.resolve(a.model), Path(a.adapter), out, OUT_DTYPES[a.dtype], parse_size(a.max_shard_size),
               a.force, a.quantize, a.device, report=not a.no_report)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up part-way
        print(f"error: writing {out} failed: {e.strerror or e}; nothing was left behind", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
