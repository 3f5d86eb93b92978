"""Streaming: training data read as a `datasets` stream (a hub dataset or local files larger than
RAM or disk), tokenized and packed on the fly, `stream_buffer` samples at a time, so memory stays
bounded whatever the source's size. Touches the data source only (nothing is cached).

The order is seeded: datasets' buffer shuffle (seed, epoch), then first-fit-decreasing packing
within each buffer and a seeded shuffle of its rows. A position is (epoch, micro-batch index).
Resume replays: the stream is read again from its start with the same seed and the micro-batches
before the checkpoint's position are skipped without being collated. That is exact when the
source yields the same records in the same order (local files unchanged, a hub dataset pinned to a
revision, org/name@revision), and costs the time to read and tokenize up to the position; a source
that changed resumes at the same count of micro-batches over other data, which cannot be detected.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from .data import Prepared, collate, eval_max_tokens, make_rows
from .datacache import BAD, DROPPED, TRUNCATED
from .encode import Tokenized, encode, tokenize
from .packing import Row, pack, positions, segment_index
from .render import Renderer, format_of
from .sources import DEMO_TRAIN, _SUFFIX_KIND, BadSample, DataError, _hub_dataset, _pick, as_dataset, json_lines

BAD_LINE = "__qlora_bad_line__"  # a record standing for a malformed JSON line, counted and left out


def _jsonl_records(path: str, on_bad: str):
    """The records of a JSON Lines file, one line at a time; a malformed line stops the stream
    naming it (error), or stands in as a BAD_LINE record (skip)."""
    for n, record, why in json_lines(path):
        if why is None:
            yield record
        elif on_bad == "skip":
            yield {BAD_LINE: f"{path}:{n}: {why}"}
        else:
            raise DataError(f"{path}:{n}: {why}; fix or remove line {n}, or set on_bad_sample: skip")


def opener(spec: str, split: str | None, subset: str | None, on_bad: str):
    """A function that opens the source as a fresh `datasets.IterableDataset`."""
    import datasets

    from ..models.hub import parse_hub_id

    path = Path(str(DEMO_TRAIN) if spec == "demo" else spec)
    if path.is_file():
        kind = _SUFFIX_KIND.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        if path.suffix.lower() == ".jsonl":
            return lambda: datasets.IterableDataset.from_generator(_jsonl_records, gen_kwargs={"path": str(path),
                                                                                               "on_bad": on_bad})  # fmt: skip
        return lambda: datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
    if path.is_dir():
        saved = datasets.load_from_disk(str(path))
        saved = _pick(saved, split, spec) if isinstance(saved, datasets.DatasetDict) else saved
        return lambda: saved.to_iterable_dataset()
    hub = parse_hub_id(spec)
    if hub is None:
        raise DataError(f"data {spec} does not exist: give a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk "
                        "directory or a hub dataset id (org/name)")  # fmt: skip
    return lambda: _pick(_hub_dataset(*hub, subset, streaming=True), split, spec)


def _take(open_stream, n: int) -> list[dict]:
    return [r for r in itertools.islice(open_stream(), n) if BAD_LINE not in r]


class StreamTokenized(Tokenized):
    """What is known of a stream before it is read: its first samples (for --dry-run)."""

    def summary(self) -> str:
        return "streamed (samples counted as they are read)"


class StreamBatches:
    """Micro-batches packed from the stream as it is read; the same interface as `data.Batches`
    (`per_epoch` is unknown: an epoch ends when the stream does)."""

    per_epoch = sys.maxsize

    def __init__(self, open_stream, renderer: Renderer, seq_len: int, packing: bool, batch_size: int, seed: int,
                 pad_id: int, buffer: int, on_bad: str, out=None):  # fmt: skip
        self.open_stream, self.renderer, self.seq_len, self.packing = open_stream, renderer, seq_len, packing
        self.batch_size, self.seed, self.pad_id, self.buffer, self.on_bad = batch_size, seed, pad_id, buffer, on_bad
        self.out = out or (lambda s: None)
        self.stats = self._fresh_stats()
        self.warned = False

    @staticmethod
    def _fresh_stats() -> dict:
        return {"records": 0, "bad": 0, "truncated": 0, "dropped": 0, "first_bad": None}

    def _records(self, epoch: int):
        ds = self.open_stream().shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(epoch)
        return iter(ds)

    def rows(self, epoch: int):
        """The rows of one epoch, buffer by buffer, in their seeded order."""
        records = self._records(epoch)
        self.stats = self._fresh_stats()  # counted per epoch (a resume replays an epoch from its start)
        for chunk_no in itertools.count():
            chunk = list(itertools.islice(records, self.buffer))
            if not chunk:
                return
            good = [r for r in chunk if BAD_LINE not in r]
            for r in chunk:
                if BAD_LINE in r:
                    self._bad(r[BAD_LINE])
            start = self.stats["records"]
            self.stats["records"] += len(good)
            try:
                enc = encode(good, self.renderer, self.seq_len, range(start, start + len(good)), self.on_bad)
            except BadSample as e:
                raise DataError(f"the stream's record {e.index + 1}: {e.why}; fix it, or set on_bad_sample: skip") from None
            for i in np.flatnonzero(enc.status & BAD):
                self._bad(f"record {start + int(i) + 1}: {enc.errors[i]}")
            self.stats["truncated"] += int(((enc.status & TRUNCATED) != 0).sum())
            self.stats["dropped"] += int(((enc.status & DROPPED) != 0).sum())
            lengths = enc.lengths[enc.lengths > 0]
            offsets = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            row_offsets, members = pack(lengths, self.seq_len, self.packing)
            order = np.random.default_rng([self.seed, epoch, chunk_no]).permutation(len(row_offsets) - 1)
            for r in order:
                m = members[row_offsets[r] : row_offsets[r + 1]]
                idx = segment_index(offsets[m], lengths[m])
                yield Row(enc.ids[idx], enc.targets[idx], positions(lengths[m]))

    def _bad(self, what: str) -> None:
        self.stats["bad"] += 1
        if self.stats["first_bad"] is None:
            self.stats["first_bad"] = what
        if not self.warned:
            self.warned = True
            self.out(f"stream: skipped a bad sample ({what}); later ones are counted")

    def stream(self, epoch: int, index: int):
        """Yield (epoch, index, batch) from a position on, forever; positions before it are read and skipped."""
        while True:
            n, pending = 0, []
            for row in self.rows(epoch):
                pending.append(row)
                if len(pending) == self.batch_size:
                    if n >= index:
                        yield epoch, n, collate(pending, self.pad_id)
                    n, pending = n + 1, []
            if pending and n >= index:
                yield epoch, n, collate(pending, self.pad_id)
            if n == 0 and not pending:
                raise DataError("the stream holds no trainable samples")
            s = self.stats
            self.out(f"stream: epoch {epoch} read: {s['records']:,} records, {s['truncated']:,} truncated, "
                     f"{s['dropped']:,} dropped, {s['bad']:,} bad skipped")  # fmt: skip
            epoch, index = epoch + 1, 0

    def get(self, epoch: int, index: int):
        return next(self.stream(epoch, index))[2]


def prepare(cfg, tokenizer, train_records=None, eval_records=None, out=None) -> Prepared:
    """`data.prepare` for `streaming: true`: the first records tell the format; eval data (eval_data)
    is read from its own stream up to the eval caps; training rows come from `Prepared.batches`."""
    out = out or (lambda s: None)
    if train_records is not None:
        raise DataError("streaming reads cfg.data; data given in memory is not streamed (set streaming: false)")
    if not cfg.max_steps:
        raise DataError("streaming needs max_steps: the length of a stream is not known before it is read")
    if cfg.eval_fraction:
        raise DataError("streaming cannot hold out a fraction of a stream of unknown length: give eval_data instead")
    seq_len = int(cfg.seq_len)
    open_train = opener(str(cfg.data), cfg.data_split, cfg.data_subset, cfg.on_bad_sample)
    head = _take(open_train, 64)
    if not head:
        raise DataError(f"{cfg.data} holds no samples: give a data file with at least one sample")
    fmt = format_of(list(head[0]), cfg.data_format)
    renderer = Renderer(tokenizer, fmt, cfg.train_on_prompt)
    first = tokenize(head, renderer, seq_len, source=str(cfg.data), on_bad=cfg.on_bad_sample)
    train = StreamTokenized(first.samples[:2])
    revision = "" if Path(str(cfg.data)).exists() or "@" in str(cfg.data) else "; pin a hub dataset to a revision (@rev)"
    notes = [f"streaming: {cfg.data} is read as a stream, {cfg.stream_buffer:,} samples packed at a time; a resume "
             f"replays the stream up to its position (exact while the source is unchanged{revision})"]  # fmt: skip
    evals, eval_rows = Tokenized([]), []
    if eval_records is not None or cfg.eval_data:
        if eval_records is not None:
            recs = as_dataset(eval_records)
            recs = recs.select(range(min(len(recs), cfg.eval_max_samples or len(recs))))
            recs = [dict(r) for r in recs]
            name = "the given eval data"
        else:
            open_eval = opener(str(cfg.eval_data), cfg.eval_split, cfg.data_subset, cfg.on_bad_sample)
            recs, name = _take(open_eval, cfg.eval_max_samples or 10**12), str(cfg.eval_data)
        evals = tokenize(recs, renderer, seq_len, source=name, on_bad=cfg.on_bad_sample)
        max_tokens = eval_max_tokens(cfg)
        if max_tokens:
            lengths = np.cumsum([len(s.ids) for s in evals.samples])
            keep = max(1, int(np.searchsorted(lengths, max_tokens, "right")))
            if keep < len(evals.samples):
                evals.capped_from, evals.samples = len(evals.samples), evals.samples[:keep]
        if not evals.samples:
            raise DataError(f"{name}: none of its first {evals.total} eval samples has a token to train on")
        eval_rows = make_rows(evals.samples, seq_len, cfg.packing)
        notes.append(f"each eval: {len(evals.samples):,} samples of {name} (the first ones, within eval_max_samples "
                     f"{cfg.eval_max_samples} and eval_max_tokens {max_tokens}), "
                     f"{sum(len(s.ids) for s in evals.samples):,} tokens in {len(eval_rows)} rows")  # fmt: skip
    else:
        notes.append("held out: nothing (no eval_data): no eval runs")

    def batches(batch_size: int, seed: int, pad_id: int) -> StreamBatches:
        return StreamBatches(open_train, renderer, seq_len, cfg.packing, batch_size, seed, pad_id, cfg.stream_buffer,
                             cfg.on_bad_sample, out)  # fmt: skip

    return Prepared(train, evals, fmt, renderer, None, eval_rows, notes, stream=batches)
