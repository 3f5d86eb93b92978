"""Where training data comes from: local files (.jsonl/.json/.csv/.parquet), a `datasets.save_to_disk`
directory, a hub dataset id (org/name[@revision]) or the caller's own records -> a `Source`: a
`datasets.Dataset` with its content hash, and the names data errors use (file, 1-based line).
Also the names every data stage shares: `DataError`, `BadSample`, `IGNORE` and the bundled demo
files. The first stage of `data`; touches the data files and datasets' cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from . import datacache

FORMATS = ("alpaca", "chat", "prompt_completion", "text", "tokens")
IGNORE = -100
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # qlora_engine/data: the bundled demo files
DEMO_TRAIN, DEMO_EVAL = DATA_DIR / "demo_train.jsonl", DATA_DIR / "demo_eval.jsonl"
_SUFFIX_KIND = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAP_BATCH = 1000  # records per datasets.map batch: enough for the tokenizer's batching, little memory per worker
PARALLEL_FROM = 4 * MAP_BATCH  # fewer records than this are prepared in this process (forking costs more)


class DataError(InputError):
    """Bad data or a data setting that does not fit it; the message says what to change."""


class BadSample(Exception):
    """A record that does not fit its format: its index in the source and why. Raised inside
    `datasets.map` workers (it pickles), and named by line or sample number by the caller."""

    def __init__(self, index: int, why: str):
        super().__init__(index, why)
        self.index, self.why = index, why


EVAL_SPLITS = ("validation", "test", "train")  # the split of eval data when none is named, in this order
# Keys that change where prepared data is kept or what an eval costs, never what training computes:
# a resume may change them.
RESUME_FREE = {"data_cache_dir", "rebuild_data", "data_num_proc", "eval_max_samples", "eval_max_tokens"}


def load_records(spec: str, split: str | None = "train", subset: str | None = None, on_bad: str = "error",
                 cache_dir: str | Path | None = None):  # fmt: skip
    """A `datasets.Dataset` from a file, a `save_to_disk` directory, a hub dataset id
    (`org/name[@revision]`, with `subset`), or "demo". `split` picks one of several splits (a hub
    dataset, a saved DatasetDict); None: the first of validation, test, train (for eval data).
    `on_bad`: "error" names the first malformed line of a JSON file, "skip" leaves such lines out."""
    return _load(spec, split, subset, on_bad, cache_dir)[0]


def _load(spec: str, split: str | None, subset: str | None, on_bad: str = "error", cache_dir=None):
    """(dataset, [(line, why) of each JSON line left out])."""
    import datasets

    if spec == "demo":
        spec = str(DEMO_TRAIN)
    path = Path(spec)
    if not path.exists():
        from ..models.hub import parse_hub_id

        hub = parse_hub_id(spec)
        if hub is None:
            raise DataError(f"data {spec} does not exist: give a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk "
                            "directory or a hub dataset id (org/name)")  # fmt: skip
        return _empty_check(_pick(_hub_dataset(*hub, subset), split, spec), spec), []
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a directory it cannot read
            raise DataError(f"{path} is not a datasets.save_to_disk directory ({type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick(ds, split, spec)
        return _empty_check(ds, spec), []
    kind = _SUFFIX_KIND.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    if kind == "json" and _blank(path):
        raise DataError(f"{path} holds no samples: give a data file with at least one sample")
    cache_dir = str(cache_dir) if cache_dir else None
    try:
        with _datasets_quiet():
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir)
        return _empty_check(ds, spec), []
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets wraps the reader's error in several types
        why = _first_line(e.__cause__ or e)
        if kind != "json":
            raise DataError(f"{path}: could not read it as {kind} ({why})") from None
    bad = check_json(path, on_bad)  # the file did not load: find the bad line (error) or every one (skip)
    if not bad:
        raise DataError(f"{path}: could not read it as json ({why})")
    return _empty_check(_load_without(path, {n for n, _ in bad}, cache_dir), spec), bad


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@contextlib.contextmanager
def _datasets_quiet():
    """datasets logs a reader's error before raising it; the raised error is reported, once."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_json(path: Path, on_bad: str = "error") -> list[tuple[int, str]]:
    """The bad lines of a JSON Lines file (or of a .json file: one JSON array of objects, or JSON
    Lines), read one line at a time: "error" raises a one-line DataError naming the first (lines
    counted from 1); "skip" returns every (line, why)."""
    path = Path(path)
    if _blank(path):
        raise DataError(f"{path} holds no samples: give a data file with at least one sample")
    if path.suffix.lower() == ".json" and _is_array(path):  # one JSON document: it is read whole
        try:
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix that line") from None
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: item {bad + 1} is a {type(data[bad]).__name__}, not an object of fields; each "
                            "sample must be a JSON object")  # fmt: skip
        return []
    bad = []
    for n, record, why in json_lines(path):
        if why is None:
            continue
        if on_bad != "skip":
            raise DataError(f"{path}:{n}: {why}; fix or remove line {n}, or set on_bad_sample: skip")
        bad.append((n, why))
    return bad


def json_lines(path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number from 1, the record, None) for each sample of a JSON Lines file, read one line
    at a time, or (line number, None, why the line is bad); blank lines are passed over."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # columns counted within the line
            except json.JSONDecodeError as e:
                yield n, None, f"not valid JSON ({e.msg}, column {e.colno})"
                continue
            if isinstance(record, dict):
                yield n, record, None
            else:
                yield n, None, f"a sample must be a JSON object of fields, got a {type(record).__name__}"


def _load_without(path: Path, skip: set[int], cache_dir):
    """The JSON Lines file without the lines in `skip`, through a cleaned copy."""
    import datasets

    with tempfile.TemporaryDirectory(dir=cache_dir) as d:
        clean = Path(d) / (path.stem + ".jsonl")
        with open(path, encoding="utf-8", errors="replace") as src, open(clean, "w", encoding="utf-8") as dst:
            for n, line in enumerate(src, 1):
                if n not in skip:
                    dst.write(line)
        try:
            with _datasets_quiet():
                return datasets.load_dataset("json", data_files=str(clean), split="train", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: could not read it as json, even without its {len(skip)} bad lines "
                            f"({_first_line(e.__cause__ or e)})") from None  # fmt: skip


def _line_of(path: Path, index: int, skipped: set[int]) -> int | None:
    """The line number (from 1) of record `index` of a JSON Lines file: blank and skipped lines hold none."""
    with open(path, encoding="utf-8", errors="replace") as f:
        k = 0
        for n, line in enumerate(f, 1):
            if line.strip() and n not in skipped:
                if k == index:
                    return n
                k += 1
    return None


def _pick(splits, split: str | None, spec: str):
    """One split of a DatasetDict: `split`, or (None) the first of EVAL_SPLITS it has."""
    for name in [split] if split else EVAL_SPLITS:
        if name in splits:
            return splits[name]
    raise DataError(f"{spec} has the splits {list(splits)}, not {split or ' / '.join(EVAL_SPLITS)}: choose one with "
                    "data_split (or eval_split)")  # fmt: skip


def _empty_check(ds, spec: str):
    if len(ds) == 0:
        raise DataError(f"{spec} holds no samples: give a data file with at least one sample")
    return ds


def _hub_dataset(repo: str, revision: str | None, subset: str | None, streaming: bool = False):
    """Every split of `datasets.load_dataset(repo, subset)`: from the hub, or offline from datasets'
    cache; when neither has it, from the repository's files in huggingface_hub's cache (where a
    pre-populated cache or an earlier `hf download` puts them)."""
    import datasets

    from ..models.hub import snapshot

    what = f"{repo}{'@' + revision if revision else ''}"
    try:
        try:
            return datasets.load_dataset(repo, name=subset, revision=revision, streaming=streaming)
        except (ConnectionError, FileNotFoundError):
            local = snapshot(repo, revision, ["*"], repo_type="dataset")
            return datasets.load_dataset(str(local), name=subset, streaming=streaming)
    except InputError:
        raise
    except (ValueError, KeyError) as e:  # an unknown subset: datasets names the ones there are
        raise DataError(f"hub dataset {what}: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for an unreadable repository
        raise DataError(f"hub dataset {what} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def as_dataset(records):
    """A `datasets.Dataset` from one, or from a list of dicts (the Python API's in-memory data)."""
    import datasets

    if isinstance(records, datasets.Dataset):
        return _empty_check(records, "the given dataset")
    if isinstance(records, (list, tuple)):
        if not records or not all(isinstance(r, dict) for r in records):
            raise DataError("in-memory data must be a non-empty list of dicts (one sample each) or a datasets.Dataset")
        return datasets.Dataset.from_list(list(records))
    raise DataError(f"in-memory data must be a datasets.Dataset or a list of dicts, got {type(records).__name__}")


@dataclass
class Source:
    """One data source of a run: its name in messages, its content hash (the cache key), its records."""

    name: str
    spec: str | None = None  # a file, directory, hub id or "demo"; None: `records`, given in memory
    records: object = None
    split: str | None = "train"
    subset: str | None = None
    skipped: list = field(default_factory=list)  # (line, why) of JSON lines left out by the last load

    @property
    def path(self) -> Path | None:
        """The local file or directory, if it is one."""
        if self.spec is None:
            return None
        p = Path(str(DEMO_TRAIN) if self.spec == "demo" else self.spec)
        return p if p.exists() else None

    def digest(self) -> dict:
        p = self.path
        if self.records is not None:
            return {"memory": _table_digest(self.records)}
        if p is not None and p.is_file():
            return {"file": datacache.file_digest([p]), "kind": p.suffix.lower()}
        if p is not None:
            files = sorted(f for f in p.rglob("*") if f.is_file())
            return {"dir": datacache.file_digest(files), "split": self.split}
        # a hub dataset: loaded (from datasets' cache when it has it) to see which revision's files it is
        self.records = self.records if self.records is not None else load_records(self.spec, self.split, self.subset)
        files = [(c["filename"], os.path.getsize(c["filename"])) for c in self.records.cache_files]
        return {"hub": self.spec, "subset": self.subset, "split": self.split, "files": files}

    def load(self, on_bad: str, scratch: Path | None):
        """The records, as a datasets.Dataset (local files read through `scratch` when given)."""
        if self.records is not None:
            return self.records
        p = self.path
        cache = scratch if p is not None and p.is_file() else None  # datasets' copy of a local file is not kept
        records, self.skipped = _load(self.spec, self.split, self.subset, on_bad, cache)
        return records

    def where(self, index: int) -> str:
        """Record `index` named for a person: file:line for JSON Lines, else the sample number."""
        p = self.path
        if p is not None and p.is_file() and p.suffix.lower() in (".jsonl", ".json") and not _is_array(p):
            line = _line_of(p, index, {n for n, _ in self.skipped})
            if line is not None:
                return f"{p}:{line}"
        return f"{self.name}: sample {index + 1}"


def _is_array(path: Path) -> bool:
    """A .json file holding one JSON array (its records are not one a line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def _table_digest(ds) -> str:
    """sha256 of a Dataset's rows as an Arrow stream (in-memory data has no file to hash)."""
    import pyarrow as pa

    h = hashlib.sha256()

    class Sink:
        closed = False

        def write(self, b):
            h.update(b)
            return len(b)

        def flush(self):
            pass

    table = ds.with_format("arrow")[:]
    with pa.ipc.new_stream(pa.PythonFile(Sink(), mode="w"), table.schema) as w:
        w.write_table(table, max_chunksize=10_000)
    return h.hexdigest()


