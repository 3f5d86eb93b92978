"""The prepared-data cache: a tokenized source as flat arrays on disk, read memory-mapped, and the
packed row tables made from it. It touches only its cache directory and the data files it hashes.

An entry is keyed by everything its bytes depend on: the data's content hash, the tokenizer, the
chat template, seq_len and the masking options. A rerun or a resume with the same key reads the
arrays in place, so host memory for the data stays small whatever its size. One entry,
<root>/<key>/:

    meta.json             what was built from what, its counts and array sizes
    ids.bin, targets.bin  int32 per token: the tokens and shifted targets of every kept sample, back to back
    offsets.bin           int64 per kept sample, plus one: where each sample starts in ids/targets
    record.bin            int64 per kept sample: the index of its record in the source
    trained.bin           int32 per kept sample: how many of its targets are trained on
    status.bin            int8 per source record: TRUNCATED / DROPPED / BAD bits
    rows-<key>/           members.bin, row_offsets.bin, meta.json: one packing of one selection

Entries and row tables are built in a temporary sibling directory that is renamed into place once
every file is fsynced (`tensorfiles.atomic_directory`), so a killed build leaves nothing that
looks complete, and the next build removes what it left.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
from pathlib import Path

import numpy as np

from ..models.tensorfiles import atomic_directory

VERSION = 1  # raise when what an entry holds, or how it is computed, changes
TRUNCATED, DROPPED, BAD = 1, 2, 4  # status bits of a source record
TOKENS = ("ids", "targets")  # the per-token arrays
ARRAYS = {"ids": np.int32, "targets": np.int32, "offsets": np.int64, "record": np.int64, "trained": np.int32,
          "status": np.int8}  # fmt: skip


def default_root() -> Path:
    """datasets' cache directory (HF_DATASETS_CACHE, else ~/.cache/huggingface/datasets) / qlora_engine."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "qlora_engine"


def root_of(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_root()


def digest(parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digest(paths) -> str:
    """sha256 of the files' bytes, in order (names excluded: a renamed file keeps its cache)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0file\0")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Everything of a tokenizer that decides its ids: the fast tokenizer's whole definition (vocab,
    merges, normalizer, added tokens), its special tokens and its class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]  # fmt: skip
    return hashlib.sha256(body.encode() + json.dumps(extra, default=str).encode()).hexdigest()


def _array(path: Path, dtype, count: int, maps: list | None = None, random: bool = False):
    """A read-only array over the file's pages (nothing is read until used); its mmap is added to
    `maps`. `random`: read in small pieces from anywhere (a packed row's samples), so no readahead."""
    if count == 0:
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)  # readahead would read ~128 KiB from disk around each sample
    if maps is not None:
        maps.append(mm)
    return np.frombuffer(mm, dtype=dtype, count=count)


def drop_pages(maps: list) -> None:
    """Unmap the pages read so far from this process (they stay in the page cache; the next read
    maps them again): without it, every page of the cache a run has read counts in its RSS."""
    for mm in maps:
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


class Store:
    """One cache entry, its arrays memory-mapped (nothing is read until a row asks for it)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        counts = meta["counts"]
        self.maps: list = []
        for name, dtype in ARRAYS.items():
            setattr(self, name, _array(self.path / f"{name}.bin", dtype, counts[name], self.maps, name in TOKENS))

    @classmethod
    def open(cls, path: Path) -> "Store | None":
        """The entry at `path`, or None when there is none or it is not whole (a file of the wrong size)."""
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
            if meta.get("version") != VERSION:
                return None
            for name, dtype in ARRAYS.items():
                if (Path(path) / f"{name}.bin").stat().st_size != meta["counts"][name] * np.dtype(dtype).itemsize:
                    return None
            return cls(path, meta)
        except (OSError, ValueError, KeyError):
            return None

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1

    def drop_pages(self) -> None:
        drop_pages(self.maps)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


class Writer:
    """Appends encoded batches to the array files of an entry being built."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.files = {name: open(self.tmp / f"{name}.bin", "wb") for name in ARRAYS}
        self.counts = dict.fromkeys(ARRAYS, 0)
        self.tokens = 0
        self._put("offsets", np.zeros(1, np.int64))

    def _put(self, name: str, values) -> None:
        a = np.ascontiguousarray(values, dtype=ARRAYS[name])
        self.files[name].write(a.tobytes())
        self.counts[name] += len(a)

    def add(self, ids, targets, lengths, records, trained, status) -> None:
        """`ids`/`targets`: the kept samples' tokens back to back; `lengths`, `records`, `trained`:
        one per kept sample; `status`: one per source record of the batch."""
        lengths = np.asarray(lengths, np.int64)
        self._put("ids", ids)
        self._put("targets", targets)
        self._put("offsets", self.tokens + np.cumsum(lengths))
        self.tokens += int(lengths.sum())
        self._put("record", records)
        self._put("trained", trained)
        self._put("status", status)

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return dict(self.counts)


def build(path: Path, fill) -> Store:
    """Build the entry at `path`: `fill(writer, tmp_dir)` writes the arrays (and may use tmp_dir for
    scratch files, removed before the rename) and returns the meta to record. Replaces an entry
    already there. Returns the new entry."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)  # a forced rebuild; the new entry appears only when complete
    with atomic_directory(path) as tmp:
        writer = Writer(tmp)
        try:
            meta = fill(writer, tmp)
        finally:
            counts = writer.close()
        for p in tmp.iterdir():
            if p.name.endswith(".bin") and p.stem in ARRAYS:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        (tmp / "meta.json").write_text(json.dumps({"version": VERSION, **meta, "counts": counts}, indent=1) + "\n")
    store = Store.open(path)
    if store is None:
        raise OSError(f"the data cache entry {path} was written but cannot be read back")
    return store


def rows(store: Store, key: str, make) -> tuple[np.ndarray, np.ndarray, dict]:
    """(row_offsets, members, meta) of one packing of `store`, made by `make()` -> (row_offsets,
    members, meta) on the first call for `key` and read memory-mapped afterwards."""
    import filelock

    path = store.path / f"rows-{key}"
    table = _open_rows(path)
    if table is not None:
        return table
    with filelock.FileLock(str(store.path / f"rows-{key}.lock")):  # another process may be making the same table
        table = _open_rows(path)
        if table is not None:
            return table
        row_offsets, members, meta = make()
        if path.exists():
            shutil.rmtree(path)
        with atomic_directory(path) as tmp:
            np.ascontiguousarray(row_offsets, np.int64).tofile(tmp / "row_offsets.bin")
            np.ascontiguousarray(members, np.int64).tofile(tmp / "members.bin")
            counts = {"row_offsets": len(row_offsets), "members": len(members)}
            (tmp / "meta.json").write_text(json.dumps({"version": VERSION, **meta, "counts": counts}) + "\n")
    table = _open_rows(path)
    if table is None:
        raise OSError(f"the row table {path} was written but cannot be read back")
    return table


def _open_rows(path: Path):
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != VERSION:
            return None
        arrays = []
        for name in ("row_offsets", "members"):
            n = meta["counts"][name]
            if (path / f"{name}.bin").stat().st_size != n * 8:
                return None
            arrays.append(_array(path / f"{name}.bin", np.int64, n))
        return arrays[0], arrays[1], meta
    except (OSError, ValueError, KeyError):
        return None

