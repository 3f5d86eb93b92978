"""Tokenizing: rendered records -> token ids and shifted targets (`targets[t]` is the token after
position t, IGNORE where no loss is taken), one tokenization with offsets marking each token
trainable or masked; over-long samples truncated or dropped, bad ones counted. `encode` works on
one batch (what `datasets.map` runs in its workers); `tokenize` on records in memory. The third
stage of `data`; touches numpy and the tokenizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datacache import BAD, DROPPED, TRUNCATED
from .packing import positions, segment_index
from .render import Rendered, Renderer
from .sources import IGNORE, MAP_BATCH, BadSample, DataError


@dataclass
class Sample:
    ids: list[int]
    targets: list[int]  # targets[t] = the token after position t, or IGNORE


@dataclass
class Encoded:
    """One batch of records, tokenized: the kept samples' tokens back to back, and per record its
    length (0 when dropped or bad), status bits and, when bad, why."""

    ids: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    status: np.ndarray
    errors: list[str]

    def samples(self) -> list[Sample]:
        out, at = [], 0
        ids, targets = self.ids.tolist(), self.targets.tolist()
        for n in self.lengths.tolist():
            if n:
                out.append(Sample(ids[at : at + n], targets[at : at + n]))
            at += n
        return out

    def table(self):
        """As a pyarrow Table, the form `datasets.map` writes without converting element by element."""
        import pyarrow as pa

        offsets = np.zeros(len(self.lengths) + 1, np.int32)
        np.cumsum(self.lengths, out=offsets[1:])
        return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.ids)),
                         "targets": pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.targets)),
                         "status": pa.array(self.status), "error": pa.array(self.errors, pa.string())})  # fmt: skip


def encode(records: list[dict], renderer: Renderer, seq_len: int, indices=None, on_bad: str = "error") -> Encoded:
    """Render, tokenize, mask, truncate and shift a batch of records. A record that does not fit
    the format raises BadSample (with its index from `indices`) or, with on_bad "skip", is kept
    out with the BAD bit."""
    n = len(records)
    indices = range(n) if indices is None else indices
    status = np.zeros(n, np.int8)
    errors = [""] * n
    if renderer.fmt == "tokens":
        ids, labels, lengths, bad = _pretokenized(records)
    else:
        ids, labels, lengths, bad = _tokenized(renderer, renderer.render_many(records))
    for i, why in bad:
        if on_bad != "skip":
            raise BadSample(indices[i], why)
        status[i] |= BAD
        errors[i] = why
    truncated = lengths > seq_len
    if truncated.any():
        keep = positions(lengths) < seq_len
        ids, labels, lengths = ids[keep], labels[keep], np.minimum(lengths, seq_len)
    targets = np.full(len(ids), IGNORE, np.int64)
    targets[:-1] = labels[1:]
    ends = np.cumsum(lengths)
    targets[ends[lengths > 0] - 1] = IGNORE  # a sample's last position predicts nothing (not the next sample)
    counted = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(targets != IGNORE, out=counted[1:])
    trained = counted[ends] - counted[ends - lengths]
    dropped = (trained == 0) & ((status & BAD) == 0)
    status |= np.where(truncated, TRUNCATED, 0).astype(np.int8) | np.where(dropped, DROPPED, 0).astype(np.int8)
    if dropped.any():
        keep = np.repeat(~dropped, lengths)
        ids, targets, lengths = ids[keep], targets[keep], np.where(dropped, 0, lengths)
    return Encoded(ids.astype(np.int32), targets.astype(np.int32), lengths, status, errors)


def _pretokenized(records) -> tuple:
    """Records that are token ids already: `input_ids`, and optional `labels` aligned with them
    (transformers' convention: -100 where no loss is taken; the shift happens in `encode`)."""
    ids, labels, lengths, bad = [], [], [], []
    for i, r in enumerate(records):
        try:
            a = np.asarray(r["input_ids"])
            b = a if r.get("labels") is None else np.asarray(r["labels"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            bad.append((i, f"does not fit the tokens format ({type(e).__name__}: {e}); fix it or set data_format"))
            lengths.append(0)
            continue
        ints = all(x.ndim == 1 and (x.dtype.kind in "iu" or x.size == 0) for x in (a, b))
        if not ints or a.shape != b.shape:
            bad.append((i, "input_ids must be whole numbers, and labels (when given) as long as input_ids"))
            lengths.append(0)
            continue
        ids.append(a.astype(np.int64))
        labels.append(b.astype(np.int64))
        lengths.append(len(a))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
    return cat(ids), cat(labels), np.asarray(lengths, np.int64), bad


def _tokenized(renderer: Renderer, rendered: list) -> tuple:
    """(ids, labels, lengths, bad) of rendered records: labels are the token where it is trained on,
    else IGNORE. Records with and without a chat template are tokenized separately (a template
    writes its own special tokens)."""
    n = len(rendered)
    bad = [(i, r) for i, r in enumerate(rendered) if isinstance(r, str)]
    lengths = np.zeros(n, np.int64)
    pieces_ids, pieces_lab, where = [], [], np.zeros(n, np.int64)
    at = 0
    for templated in (True, False):
        group = [i for i, r in enumerate(rendered) if isinstance(r, Rendered) and r.templated == templated]
        if not group:
            continue
        ids, lab, lens = _tokenize_group(renderer.tok, [rendered[i] for i in group])
        starts = np.zeros(len(group), np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        where[group] = at + starts
        lengths[group] = lens
        pieces_ids.append(ids)
        pieces_lab.append(lab)
        at += len(ids)
    if not pieces_ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), lengths, bad
    idx = segment_index(where, lengths)  # back into record order
    return np.concatenate(pieces_ids)[idx], np.concatenate(pieces_lab)[idx], lengths, bad


def _tokenize_group(tok, items: list[Rendered]) -> tuple:
    enc = tok([r.text for r in items], add_special_tokens=not items[0].templated, return_offsets_mapping=True,
              return_attention_mask=False, return_token_type_ids=False)  # only ids and offsets: a fifth less time
    id_lists, offsets = enc["input_ids"], enc["offset_mapping"]
    lens = np.fromiter(map(len, id_lists), np.int64, len(items))
    total = int(lens.sum())
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, total)
    off = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offsets)), np.int64, 2 * total)
    keep = _trained_tokens(off[0::2], off[1::2], lens, [r.spans for r in items], [len(r.text) for r in items])
    eos = tok.eos_token_id
    wants = np.array([r.add_eos for r in items])
    if eos is not None and wants.any():
        ends = np.cumsum(lens)
        last = ids[np.maximum(ends - 1, 0)] if total else np.zeros(len(items), np.int64)
        need = wants & ((lens == 0) | (last != eos))
        ids = np.insert(ids, ends[need], eos)
        keep = np.insert(keep, ends[need], True)
        lens = lens + need
    return ids, np.where(keep, ids, IGNORE), lens


def _trained_tokens(s, e, lens, spans, text_lens) -> np.ndarray:
    """Per token: does it overlap a trainable character span of its sample (and cover a character)?

    Offsets of a fast tokenizer run forward, so the tokens overlapping [a, b) are the run from the
    first token ending after a to the last starting before b: two binary searches per span over
    offsets made global by shifting each sample past the previous one. Where offsets do not run
    forward, each sample is checked token by token."""
    total, n = len(s), len(lens)
    if total == 0:
        return np.zeros(0, bool)
    of_token = np.repeat(np.arange(n), lens)
    text_lens = np.asarray(text_lens, np.int64)
    base = np.zeros(n, np.int64)
    np.cumsum(text_lens[:-1] + 1, out=base[1:])
    S, E = s + base[of_token], e + base[of_token]
    span_counts = [len(x) for x in spans]
    flat = np.asarray([ab for x in spans for ab in x], np.int64).reshape(-1, 2)
    forward = bool((e <= text_lens[of_token]).all() and (np.diff(S) >= 0).all() and (np.diff(E) >= 0).all())
    if forward:
        shift = np.repeat(base, span_counts)
        lo = np.searchsorted(E, flat[:, 0] + shift, "right")
        hi = np.searchsorted(S, flat[:, 1] + shift, "left")
        ok = lo < hi
        edges = np.zeros(total + 1, np.int64)
        np.add.at(edges, lo[ok], 1)
        np.add.at(edges, hi[ok], -1)
        covered = np.cumsum(edges[:-1]) > 0
    else:
        covered = np.zeros(total, bool)
        start = 0
        for k in range(n):
            sk, ek = s[start : start + lens[k]], e[start : start + lens[k]]
            for a, b in spans[k]:
                covered[start : start + lens[k]] |= (sk < b) & (ek > a)
            start += lens[k]
    return covered & (e > s)


@dataclass
class Tokenized:
    samples: Sequence[Sample]
    total: int = 0  # records
    truncated: int = 0
    dropped: int = 0  # no trainable token left after truncation
    first_dropped: int | None = None  # its sample number, counted from 1
    bad: int = 0  # records (or lines) that did not fit and were skipped (on_bad_sample: skip)
    first_bad: str | None = None
    tokens: int | None = None
    trained: int | None = None
    capped_from: int | None = None  # samples before an eval cap

    @property
    def trainable_tokens(self) -> int:
        if self.trained is not None:
            return self.trained
        return sum(sum(t != IGNORE for t in s.targets) for s in self.samples)

    def summary(self) -> str:
        tokens = self.tokens if self.tokens is not None else sum(len(s.ids) for s in self.samples)
        first = f" (nothing to train on; the first is sample {self.first_dropped})" if self.dropped else ""
        bad = f"; {self.bad} bad skipped (the first: {self.first_bad})" if self.bad else ""
        count = f"{len(self.samples)} of {self.capped_from}" if self.capped_from is not None else f"{len(self.samples)}"
        return (f"{count} samples, {tokens} tokens ({self.trainable_tokens} trained on); {self.truncated} of "
                f"{self.total} truncated to seq_len, {self.dropped} dropped{first}{bad}")  # fmt: skip

    def drop(self, i: int) -> None:
        self.dropped += 1
        if self.first_dropped is None:
            self.first_dropped = i + 1


def _as_records(batch: dict) -> list[dict]:
    """datasets' column batch -> one dict per record."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def tokenize(records, renderer: Renderer, seq_len: int, batch: int = MAP_BATCH, source: str = "data",
             on_bad: str = "error") -> Tokenized:  # fmt: skip
    """Render and tokenize records held in memory (a list of dicts or a datasets.Dataset); samples
    left with nothing to train on are counted (and the first named), errors name the sample
    (counted from 1)."""
    out = Tokenized([], total=len(records))
    for start in range(0, len(records), batch):
        end = min(start + batch, len(records))
        chunk = records[start:end]
        chunk = _as_records(chunk) if isinstance(chunk, dict) else list(chunk)
        try:
            enc = encode(chunk, renderer, seq_len, range(start, end), on_bad)
        except BadSample as e:
            raise DataError(f"{source}: sample {e.index + 1}: {e.why}") from None
        out.samples.extend(enc.samples())
        out.truncated += int(((enc.status & TRUNCATED) != 0).sum())
        for i in np.flatnonzero(enc.status & DROPPED):
            out.drop(start + int(i))
        for i in np.flatnonzero(enc.status & BAD):
            out.bad += 1
            out.first_bad = out.first_bad or f"sample {start + int(i) + 1}: {enc.errors[i]}"
    return out


