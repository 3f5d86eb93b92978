"""The fidelity report of an export: how close the exported model is to the model that was
trained, on held-out text (the run's own held-out samples when training saved them).

The reference is the trained model (its base built as in training + the adapter), run in float32
by default so that the models compared differ only in their weights; the trained model in bf16 is
shown as the noise floor of bf16 arithmetic. Per model: max and mean |logit difference|, mean KL,
top-1 agreement and perplexity, over the distinct positions of the held-out samples.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..lora import peft_format
from ..lora.inject import lora_layers
from ..models.hub import has_tokenizer, load_tokenizer
from ..models.loader import BASE_DTYPE, is_4bit_checkpoint, load_model
from ..train.evaluate import sum_nll, token_windows
from .merge import DTYPE_JSON, Adapter

HELDOUT_TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"


def heldout_samples(adapter_dir: str | Path, tokenizer, window: int = 128) -> tuple[list[torch.Tensor], str]:
    """Token-id sequences to compare models on: the run's own held-out samples (`heldout_ids.json`,
    written by training) when present, else the bundled English text cut into windows."""
    path = Path(adapter_dir) / peft_format.HELDOUT
    if path.exists():
        samples = [torch.tensor(s, dtype=torch.long) for s in json.loads(path.read_text())["samples"] if len(s) >= 2]
        if samples:
            return samples, f"{path} ({len(samples)} held-out samples of the run)"
    if tokenizer is None:
        raise ValueError(f"no held-out text to compare on: {adapter_dir} has no {peft_format.HELDOUT} and the base has no tokenizer "
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
        nll, n = sum_nll(logits[:-1][nxt], ids[1:][nxt])
        self.nll += nll
        self.n_next += n
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

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=BASE_DTYPE).eval()
    with torch.no_grad():
        for name, layer in lora_layers(trained).items():
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
    dtype = dtype or BASE_DTYPE
    cd = DTYPE_JSON.get(compute_dtype, "float32")
    as_trained = peft_format.load_with_adapter(base_dir, adapter_dir, device)  # bf16, as in training
    trained = copy.deepcopy(as_trained).to(compute_dtype)
    models = {}  # key -> (row label, model)
    if compute_dtype != BASE_DTYPE:
        models["trained_bf16"] = ("trained model, bf16 compute (noise floor)", as_trained)
    models["export"] = (f"export ({DTYPE_JSON[dtype]} weights, transformers)",
                        AutoModelForCausalLM.from_pretrained(export_dir, dtype=compute_dtype).to(device).eval())  # fmt: skip
    if original and adapter.base_kind == "nf4" and not is_4bit_checkpoint(base_dir):
        naive = merged_into_original(base_dir, as_trained, dtype).to(device=device, dtype=compute_dtype)
        models["original"] = (f"merged into the original weights ({DTYPE_JSON[dtype]})", naive)
    if nf4_dir is not None:
        models["nf4"] = ("export re-quantized to NF4 (engine loader)", load_model(nf4_dir, device, compute_dtype, progress=False).eval())
    if samples is None:
        tok = load_tokenizer(export_dir) if has_tokenizer(export_dir) else None
        samples, source = heldout_samples(adapter_dir, tok)
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
