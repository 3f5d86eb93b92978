"""Training data: local files, a saved dataset, a hub dataset or the caller's own records -> rendered
text with trainable spans -> token ids and shifted targets -> rows (packed or not) -> micro-batches
in a seeded, resumable order.

Every format is rendered to one string plus the character spans the loss is computed on (the
completion, or the assistant turns); one tokenization with offsets then marks each token trainable
or masked. Targets are shifted here (`targets[t]` is the token after position t), so a packed row
never asks one sample to predict the next one's first token.

The stages are modules: `sources` (records in), `render` (formats), `encode` (tokens and
targets); this one makes rows and micro-batches and runs it all: `prepare` runs the stages once per
source through `datasets.map` (batches of records, the fast tokenizer, one process per core) and
keeps the result in the data cache (`datacache`), keyed by the data's content hash, the tokenizer
and the settings, and read memory-mapped; rows come from `packing`. `tokenize` does the same for
records in memory; `streaming` reads a source larger than disk. The stages' names are re-exported
here. Touches the data files, datasets' cache and the data cache.
"""


from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import datacache
from .datacache import BAD, DROPPED, TRUNCATED
from .packing import Row, RowView, pack
# the stages before rows, re-exported here: `data` is the one name the trainer and tests use
from .encode import Encoded, Sample, Tokenized, _as_records, encode, tokenize  # noqa: F401
from .render import Renderer, detect_format, format_of  # noqa: F401
from .sources import (DATA_DIR, DEMO_EVAL, DEMO_TRAIN, EVAL_SPLITS, FORMATS, IGNORE, MAP_BATCH, PARALLEL_FROM,  # noqa: F401
                      RESUME_FREE, BadSample, DataError, Source, _datasets_quiet, as_dataset, check_json, json_lines,
                      load_records)  # fmt: skip


def make_rows(samples: list[Sample], seq_len: int, packing: bool) -> list[Row]:
    """Rows of samples held in memory. Packed: first-fit-decreasing into rows of at most seq_len
    tokens (`packing.first_fit_decreasing`). Unpacked: one sample per row."""
    row_offsets, members = pack([len(s.ids) for s in samples], seq_len, packing)
    rows = []
    for r in range(len(row_offsets) - 1):
        row = Row()
        for i in members[row_offsets[r] : row_offsets[r + 1]]:
            row.add(samples[i])
        rows.append(row)
    return rows


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Pad tokens get their own position run (so packed-row detection treats
    them as a separate sequence) and IGNORE targets; causal attention keeps real tokens from
    seeing them, so no attention mask is needed."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.as_tensor(np.asarray(r.ids, np.int64))
        targets[i, :n] = torch.as_tensor(np.asarray(r.targets, np.int64))
        pos[i, :n] = torch.as_tensor(np.asarray(r.positions, np.int64))
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "targets": targets, "position_ids": pos}


class Batches:
    """Micro-batches in a seeded order that differs per epoch; a position is (epoch, index). `rows`:
    a list of Rows, or a `packing.RowView` over memory-mapped arrays (rows are read when batched)."""

    def __init__(self, rows: Sequence[Row], batch_size: int, seed: int, pad_id: int):
        if not len(rows):
            raise DataError("no training rows: the data is empty, or every sample was dropped")
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.per_epoch = math.ceil(len(rows) / batch_size)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def get(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        order = self.order(epoch)
        pick = order[index * self.batch_size : (index + 1) * self.batch_size]
        return collate([self.rows[i] for i in pick], self.pad_id)

    def stream(self, epoch: int, index: int):
        """Yield (epoch, index, batch) from a position on, forever."""
        while True:
            order = self.order(epoch)
            while index < self.per_epoch:
                pick = order[index * self.batch_size : (index + 1) * self.batch_size]
                yield epoch, index, collate([self.rows[i] for i in pick], self.pad_id)
                index += 1
            epoch, index = epoch + 1, 0


def eval_batches(rows: Sequence[Row], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


# ---- prepare: sources -> cache -> parts -> rows ------------------------------------------------


class SampleView(Sequence):
    """Samples of a cache entry, read from its memory-mapped arrays when asked for."""

    def __init__(self, store: datacache.Store, indices: np.ndarray):
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        s = int(self.indices[i])
        a, b = int(self.store.offsets[s]), int(self.store.offsets[s + 1])
        return Sample(self.store.ids[a:b].tolist(), self.store.targets[a:b].tolist())


@dataclass
class Prepared:
    train: Tokenized
    eval: Tokenized  # no samples when nothing is evaluated
    fmt: str
    renderer: Renderer
    train_rows: Sequence[Row] | None = None  # None when streaming
    eval_rows: Sequence[Row] = ()
    notes: list[str] = field(default_factory=list)  # what was held out, cached, capped: for the run's report
    stream: object = None  # streaming.StreamBatches factory when the data is streamed

    @property
    def has_eval(self) -> bool:
        return len(self.eval_rows) > 0

    def batches(self, batch_size: int, seed: int, pad_id: int):
        """The training micro-batches: over the cached rows, or read from the stream."""
        if self.stream is not None:
            return self.stream(batch_size, seed, pad_id)
        return Batches(self.train_rows, batch_size, seed, pad_id)

    def describe_rows(self, seq_len: int) -> str:
        if self.train_rows is None:
            return "rows packed from the stream as it is read"
        meta = getattr(self.train_rows, "meta", None) or {}
        fill = f", {100 * meta['efficiency']:.1f}% of row tokens real" if meta.get("efficiency") is not None else ""
        return f"{len(self.train_rows)} rows per epoch{fill}"


def _num_proc(setting: int, records: int) -> int:
    if records < PARALLEL_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = setting or cores
    return max(1, min(want, records // MAP_BATCH))


def _encode_map(batch, indices, renderer, seq_len, on_bad):
    """datasets.map's function: one batch of records -> a pyarrow table of encoded samples."""
    return encode(_as_records(batch), renderer, seq_len, indices, on_bad).table()


def _store(src: Source, cfg, tokenizer, data_format: str, out) -> tuple[datacache.Store, str]:
    """The cache entry of one source under this run's settings: read, or built now. Returns it and
    a line saying which."""
    seq_len = int(cfg.seq_len)
    t0 = time.perf_counter()
    key = datacache.digest({"data": src.digest(), "tokenizer": datacache.tokenizer_digest(tokenizer),
                            "chat_template": getattr(tokenizer, "chat_template", None), "format": data_format,
                            "seq_len": seq_len, "train_on_prompt": cfg.train_on_prompt,
                            "on_bad_sample": cfg.on_bad_sample, "version": datacache.VERSION})  # fmt: skip
    root = datacache.root_of(cfg.data_cache_dir)
    path = root / key
    if not cfg.rebuild_data and (store := datacache.Store.open(path)) is not None:
        return store, f"data cache: {src.name} read from {path} ({time.perf_counter() - t0:.2f} s)"
    import filelock

    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(root / f"{key}.lock")):  # a second process preparing the same data waits for the first
        if not cfg.rebuild_data and (store := datacache.Store.open(path)) is not None:
            return store, f"data cache: {src.name} read from {path} (prepared by another process)"

        phases = {}

        def fill(writer: datacache.Writer, tmp: Path) -> dict:
            records = src.load(cfg.on_bad_sample, tmp / "records")
            phases["load"] = time.perf_counter() - t0
            fmt = format_of(records.column_names, data_format)
            renderer = Renderer(tokenizer, fmt, cfg.train_on_prompt)
            procs = _num_proc(cfg.data_num_proc, len(records))
            out(f"data: preparing {src.name} ({len(records):,} records, {fmt}, {procs} process{'es' * (procs > 1)}); "
                f"kept for later runs in {root}")  # fmt: skip
            (tmp / "map").mkdir()
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers fork after the tokenizer ran
            try:
                with _datasets_quiet():
                    mapped = records.map(_encode_map, batched=True, batch_size=MAP_BATCH, with_indices=True,
                                         remove_columns=records.column_names, num_proc=procs if procs > 1 else None,
                                         fn_kwargs={"renderer": renderer, "seq_len": seq_len, "on_bad": cfg.on_bad_sample},
                                         cache_file_name=str(tmp / "map" / "encoded.arrow"), load_from_cache_file=False,
                                         new_fingerprint=key, desc=f"preparing {src.name}")  # fmt: skip
            except BadSample as e:
                raise DataError(f"{src.where(e.index)}: {e.why}; fix it or leave it out, or set on_bad_sample: skip") from None
            phases["tokenize"] = time.perf_counter() - t0 - phases["load"]
            stats = _write(mapped, writer)
            phases["write"] = time.perf_counter() - t0 - phases["load"] - phases["tokenize"]
            rows = stats.pop("rows")
            if rows != len(records):
                raise RuntimeError(f"datasets.map returned {rows} rows for {len(records)} records")
            first_bad = stats.pop("first_bad")
            if src.skipped:
                line, why = src.skipped[0]
                first_bad = f"line {line}: {why}"
            elif first_bad is not None:
                first_bad = f"{src.where(first_bad[0])}: {first_bad[1]}"
            return {"source": src.name, "format": fmt, "columns": records.column_names, "records": len(records),
                    "skipped_lines": len(src.skipped), "first_bad": first_bad, "seq_len": seq_len,
                    "num_proc": procs, "seconds": round(time.perf_counter() - t0, 2),
                    "phases": {k: round(v, 2) for k, v in phases.items()}, **stats}  # fmt: skip

        store = datacache.build(path, fill)
    took = ", ".join(f"{k} {v:.1f} s" for k, v in store.meta["phases"].items())
    return store, f"data cache: {src.name} prepared in {time.perf_counter() - t0:.1f} s ({took}), kept in {path}"


def _write(mapped, writer: datacache.Writer) -> dict:
    """Stream datasets.map's Arrow files (one record batch at a time, not memory-mapped whole) into
    the cache entry's flat arrays."""
    import pyarrow as pa

    rows, first_bad = 0, None
    for f in mapped.cache_files:
        with pa.OSFile(f["filename"]) as src:
            for rb in pa.ipc.open_stream(src):
                status = rb.column("status").to_numpy()
                ids_col, tgt_col = rb.column("input_ids"), rb.column("targets")
                lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
                ids, targets = ids_col.flatten().to_numpy(), tgt_col.flatten().to_numpy()
                kept = lengths > 0
                counted = np.zeros(len(targets) + 1, np.int64)
                np.cumsum(targets != IGNORE, out=counted[1:])
                ends = np.cumsum(lengths)
                trained = (counted[ends] - counted[ends - lengths])[kept]
                writer.add(ids, targets, lengths[kept], rows + np.flatnonzero(kept), trained, status)
                bad = np.flatnonzero(status & BAD)
                if first_bad is None and len(bad):
                    first_bad = (rows + int(bad[0]), rb.column("error")[int(bad[0])].as_py())
                rows += rb.num_rows
    return {"rows": rows, "first_bad": first_bad}


def _part(store: datacache.Store, records: np.ndarray | None, extra_bad: int = 0,
          first_bad: str | None = None) -> tuple[Tokenized, np.ndarray]:  # fmt: skip
    """The Tokenized summary of some of a store's records (None: all) and its kept samples' indices."""
    status = np.asarray(store.status)
    if records is None:
        samples = np.arange(store.samples)
        part_status, records = status, np.arange(len(status))
    else:
        chosen = np.zeros(len(status), bool)
        chosen[records] = True
        samples = np.flatnonzero(chosen[np.asarray(store.record)])
        part_status = status[records]
    lengths = store.lengths[samples]
    dropped = np.flatnonzero(part_status & DROPPED)
    bad = int(((part_status & BAD) != 0).sum())
    t = Tokenized(SampleView(store, samples), total=len(records), truncated=int(((part_status & TRUNCATED) != 0).sum()),
                  dropped=len(dropped), first_dropped=int(records[dropped[0]]) + 1 if len(dropped) else None,
                  bad=bad + extra_bad, first_bad=first_bad if bad + extra_bad else None, tokens=int(lengths.sum()),
                  trained=int(np.asarray(store.trained)[samples].sum()))  # fmt: skip
    return t, samples


def _rows(store: datacache.Store, samples: np.ndarray, seq_len: int, packing: bool) -> RowView:
    """The rows of `samples`, packed once and kept in the cache entry."""
    key = datacache.digest({"samples": hashlib.sha256(np.ascontiguousarray(samples, np.int64).tobytes()).hexdigest(),
                            "seq_len": seq_len, "packing": packing})  # fmt: skip

    def make():
        row_offsets, members = pack(store.lengths[samples], seq_len, packing)
        tokens = int(store.lengths[samples].sum())
        rows = len(row_offsets) - 1
        meta = {"rows": rows, "tokens": tokens, "efficiency": tokens / max(rows * seq_len, 1)}
        return row_offsets, samples[members], meta

    row_offsets, members, meta = datacache.rows(store, key, make)
    view = RowView(store.ids, store.targets, store.offsets, members, row_offsets, release=store.drop_pages)
    view.meta = meta
    return view


# eval_max_tokens auto: SmolLM2-135M's eval forward runs ~600 tokens/s on one CPU core, so ~15 s an eval
EVAL_TOKENS_CPU, EVAL_TOKENS_GPU = 8192, 262144


def eval_max_tokens(cfg) -> int:
    """eval_max_tokens with auto resolved for the run's device."""
    if cfg.eval_max_tokens != "auto":
        return int(cfg.eval_max_tokens)
    from ..machine import resolve_device

    return EVAL_TOKENS_GPU if resolve_device(cfg.device).type == "cuda" else EVAL_TOKENS_CPU


def _eval_cap(store: datacache.Store, samples: np.ndarray, max_samples: int, max_tokens: int) -> np.ndarray:
    """The first samples within eval_max_samples and eval_max_tokens (at least one)."""
    keep = len(samples) if not max_samples else min(len(samples), max_samples)
    if max_tokens:
        within = int(np.searchsorted(np.cumsum(store.lengths[samples[:keep]]), max_tokens, "right"))
        keep = max(1, min(keep, within))
    return samples[:keep]


def prepare(cfg, tokenizer, train_records=None, eval_records=None, out=None) -> Prepared:
    """Load, split, render and tokenize train and eval data per the config, through the data
    cache; rows packed per the config. `train_records` / `eval_records` (a datasets.Dataset or a
    list of dicts) replace cfg.data / cfg.eval_data. `out` receives progress lines (building a
    cache entry takes a while); what was held out, cached and capped is in `Prepared.notes`."""
    out = out or (lambda s: None)
    if cfg.on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be error or skip, got {cfg.on_bad_sample!r}")
    if cfg.streaming:
        from . import streaming

        return streaming.prepare(cfg, tokenizer, train_records, eval_records, out)
    seq_len = int(cfg.seq_len)
    if train_records is not None:
        src = Source("the given data", records=as_dataset(train_records))
    else:
        src = Source(str(cfg.data), spec=str(cfg.data), split=cfg.data_split, subset=cfg.data_subset)
    notes = []
    store, line = _store(src, cfg, tokenizer, cfg.data_format, out)
    notes.append(line)
    fmt = store.meta["format"]
    renderer = Renderer(tokenizer, fmt, cfg.train_on_prompt)
    eval_spec = cfg.eval_data or (str(DEMO_EVAL) if cfg.data == "demo" and train_records is None else None)
    eval_src = None
    if eval_records is not None:
        eval_src = Source("the given eval data", records=as_dataset(eval_records))
    elif eval_spec:
        eval_src = Source(str(eval_spec), spec=str(eval_spec), split=cfg.eval_split, subset=cfg.data_subset)
    n = store.meta["records"]
    skipped, first_bad = store.meta.get("skipped_lines", 0), store.meta.get("first_bad")
    if eval_src is not None:
        eval_store, line = _store(eval_src, cfg, tokenizer, fmt, out)
        notes.append(line)
        train_recs, eval_recs = None, None
        eval_name = eval_src.name
    elif cfg.eval_fraction > 0:
        if n < 2:
            raise DataError(f"{src.name} has {n} sample(s): too few to hold some out; give eval_data")
        k = max(1, round(cfg.eval_fraction * n))
        held = np.zeros(n, bool)
        held[np.random.default_rng(cfg.seed).permutation(n)[:k]] = True
        train_recs, eval_recs = np.flatnonzero(~held), np.flatnonzero(held)
        eval_store, eval_name = store, f"{src.name} (the held-out part)"
        notes.append(f"held out: {k:,} of {n:,} records of {src.name} for eval, not trained on (eval_fraction "
                     f"{cfg.eval_fraction}, seed {cfg.seed})")  # fmt: skip
    else:
        eval_store = None
        train_recs = None
        notes.append("held out: nothing (no eval_data, eval_fraction 0): every record trains and no eval runs; set "
                     "eval_data, or eval_fraction to hold some out")  # fmt: skip
    if cfg.max_samples:
        train_recs = (np.arange(n) if train_recs is None else train_recs)[: cfg.max_samples]
    train, train_samples = _part(store, train_recs, skipped, first_bad)
    if not len(train.samples):
        raise DataError(f"{src.name}: none of its {train.total} training samples has a token to train on (the first is "
                        f"sample {train.first_dropped}): an empty completion or assistant turn, or one past seq_len "
                        f"{seq_len}; check the columns and data_format, or set train_on_prompt: true")  # fmt: skip
    train_rows = _rows(store, train_samples, seq_len, cfg.packing)
    if eval_store is None:
        evals, eval_rows = Tokenized([]), []
    else:
        extra = (eval_store.meta.get("skipped_lines", 0), eval_store.meta.get("first_bad")) if eval_recs is None else (0, None)
        evals, eval_samples = _part(eval_store, eval_recs, *extra)
        if not len(evals.samples):
            raise DataError(f"{eval_name}: none of its {evals.total} eval samples has a token to train on (the first is "
                            f"sample {evals.first_dropped}): an empty completion or assistant turn, or one past seq_len "
                            f"{seq_len}; check the columns and data_format, or set train_on_prompt: true")  # fmt: skip
        max_tokens = eval_max_tokens(cfg)
        capped = _eval_cap(eval_store, eval_samples, cfg.eval_max_samples, max_tokens)
        if len(capped) < len(eval_samples):
            evals.capped_from = len(eval_samples)
            evals.samples = SampleView(eval_store, capped)
            evals.tokens = int(eval_store.lengths[capped].sum())
            evals.trained = int(np.asarray(eval_store.trained)[capped].sum())
        eval_rows = _rows(eval_store, capped, seq_len, cfg.packing)
        cap = (f" (of {len(eval_samples):,}: eval_max_samples {cfg.eval_max_samples}, eval_max_tokens "
               f"{max_tokens})" if evals.capped_from is not None else "")  # fmt: skip
        notes.append(f"each eval: {len(capped):,} samples{cap} of {eval_name}, {evals.tokens:,} tokens in "
                     f"{len(eval_rows)} rows, {evals.trainable_tokens:,} of them scored")  # fmt: skip
    return Prepared(train, evals, fmt, renderer, train_rows, eval_rows, notes)


def show_sample(tokenizer, sample: Sample, color: bool) -> str:
    """The sample's tokens, with trained-on tokens marked: green when `color`, else inside «»."""
    trained = [False] + [t != IGNORE for t in sample.targets[:-1]]  # token t is trained if position t-1 predicts it
    parts, cur, buf = [], None, []
    for tid, on in zip(sample.ids, trained):
        if on != cur and buf:
            parts.append((cur, tokenizer.decode(buf)))
            buf = []
        cur = on
        buf.append(tid)
    if buf:
        parts.append((cur, tokenizer.decode(buf)))
    if color:
        return "".join(f"\033[32m{t}\033[0m" if on else f"\033[2m{t}\033[0m" for on, t in parts)
    return "".join(f"«{t}»" if on else t for on, t in parts)
