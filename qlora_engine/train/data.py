"""Training data: local files, a saved dataset, a hub dataset or the caller's own records -> rendered
text with trainable spans -> token ids and shifted targets -> rows (packed or not) -> micro-batches
in a seeded, resumable order.

Every format is rendered to one string plus the character spans the loss is computed on (the
completion, or the assistant turns); one tokenization with offsets then marks each token trainable
or masked. Targets are shifted here (`targets[t]` is the token after position t), so a packed row
never asks one sample to predict the next one's first token.

`prepare` runs this once per source through `datasets.map` (batches of records, the fast
tokenizer, one process per core) and keeps the result in the data cache (`datacache`), keyed by
the data's content hash, the tokenizer and the settings, and read memory-mapped; rows come from
`packing`. `tokenize` does the same for records in memory; `streaming` reads a source larger than
disk. Touches the data files, datasets' cache and the data cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from . import datacache
from .datacache import BAD, DROPPED, TRUNCATED
from .packing import Row, RowView, pack, positions, segment_index

FORMATS = ("alpaca", "chat", "prompt_completion", "text", "tokens")
IGNORE = -100
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # qlora_engine/data: the bundled demo files
DEMO_TRAIN, DEMO_EVAL = DATA_DIR / "demo_train.jsonl", DATA_DIR / "demo_eval.jsonl"
_SUFFIX_KIND = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Used when data is in chat form but the tokenizer has no chat template of its own.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n{input}### Response:\n")  # fmt: skip
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


# ---- loading records ---------------------------------------------------------------------------


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


# ---- formats -----------------------------------------------------------------------------------


def detect_format(columns) -> str:
    cols = set(columns)
    if "input_ids" in cols:
        return "tokens"
    if cols & {"messages", "conversations"}:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(f"cannot tell the format from columns {sorted(cols)}: expected messages (chat), instruction+output "
                    f"(alpaca), prompt+completion, text, or input_ids (already tokenized)")  # fmt: skip


_DETECT = {"chat": {"messages", "conversations"}, "alpaca": {"instruction"}, "prompt_completion": {"prompt"},
           "text": {"text"}, "tokens": {"input_ids"}}  # fmt: skip


def format_of(columns, data_format: str) -> str:
    """The format of records with these columns: detected ("auto"), or the one asked for if it fits."""
    if data_format == "auto":
        return detect_format(columns)
    if not _DETECT[data_format] & set(columns):
        raise DataError(f"data_format {data_format} does not fit columns {list(columns)}")
    return data_format


_REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system", "bot": "assistant"}  # fmt: skip


def _messages(record) -> list[dict]:
    raw = record.get("messages") or record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise DataError("a chat sample needs a non-empty 'messages' list of {role, content}")
    out = []
    for m in raw:
        # Arrow gives every message every key of the column (role/content and from/value), None where absent
        role = _ROLES.get(str(m.get("role") or m.get("from") or "").lower())
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None or not isinstance(content, str):
            raise DataError(f"chat message {m!r} needs role (system/user/assistant) and content")
        out.append({"role": role, "content": content})
    return out


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges the loss is computed on
    templated: bool  # rendered by a chat template (which writes its own special tokens)
    add_eos: bool


class Renderer:
    """Turns records of one format into text + trainable spans."""

    def __init__(self, tokenizer, fmt: str, train_on_prompt: bool = False):
        self.tok, self.fmt, self.train_on_prompt = tokenizer, fmt, train_on_prompt
        self.template = getattr(tokenizer, "chat_template", None)

    def __call__(self, record) -> Rendered:
        r = self.render_many([record])[0]
        if isinstance(r, str):
            raise DataError(r)
        return r

    def render_many(self, records) -> list[Rendered | str]:
        """Each record rendered, or why it cannot be (a string). Conversations of the batch go through
        the chat template in two batched calls."""
        items: list = []
        for rec in records:
            try:
                items.append(self._one(rec))
            except DataError as e:
                items.append(str(e))
            except (KeyError, TypeError, AttributeError) as e:
                items.append(f"does not fit the {self.fmt} format ({type(e).__name__}: {e}); fix it or set data_format")
        chats = [i for i, x in enumerate(items) if isinstance(x, list)]
        for i, r in zip(chats, self._chats([items[i] for i in chats])):
            items[i] = r
        return items

    def _one(self, record) -> list[dict] | Rendered:
        """A record as its messages (rendered later, in a batch) or rendered plain text."""
        if self.fmt == "chat":
            return _messages(record)
        # Arrow fills a column a record lacks with None: a missing field, not the text "None"
        missing = [k for k in _REQUIRED[self.fmt] if record.get(k) is None]
        if missing:
            raise DataError(f"a {self.fmt} sample needs {' and '.join(_REQUIRED[self.fmt])}; it has no {missing[0]}")
        if self.fmt == "alpaca":
            instr, inp, out = str(record["instruction"]), str(record.get("input") or ""), str(record["output"])
            if self.template:
                user = instr + (f"\n\n{inp}" if inp else "")
                return [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
            prompt = ALPACA.format(ctx=", paired with an input that provides further context" if inp else "",
                                   instruction=instr, input=f"### Input:\n{inp}\n\n" if inp else "")  # fmt: skip
            return self._plain(prompt, out)
        if self.fmt == "prompt_completion":
            return self._plain(str(record["prompt"]), str(record["completion"]))
        return self._plain("", str(record["text"]))

    def _chats(self, convs: list[list[dict]]) -> list[Rendered | str]:
        """Each assistant turn's span is found by rendering the conversation up to it: the text before
        (with the generation prompt) and the text up to its end must be prefixes of the whole."""
        full_jobs, gen_jobs, plan = [], [], []
        for msgs in convs:
            f, turns = len(full_jobs), []
            full_jobs.append(msgs)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                gen_jobs.append(msgs[:i])
                if i == len(msgs) - 1:
                    turns.append((len(gen_jobs) - 1, f))
                else:
                    full_jobs.append(msgs[: i + 1])
                    turns.append((len(gen_jobs) - 1, len(full_jobs) - 1))
            plan.append((f, turns))
        full, gen = self._apply(full_jobs, False), self._apply(gen_jobs, True)
        out: list[Rendered | str] = []
        for f, turns in plan:
            text, spans = full[f], []
            if isinstance(text, Exception):
                out.append(f"the chat template cannot render it ({type(text).__name__}: {_first_line(text)})")
                continue
            if not turns:
                out.append("a chat sample has no assistant message to learn from")
                continue
            for b, u in turns:
                before, upto = gen[b], full[u]
                if isinstance(before, Exception) or isinstance(upto, Exception):
                    e = before if isinstance(before, Exception) else upto
                    spans = f"the chat template cannot render part of it ({type(e).__name__}: {_first_line(e)})"
                    break
                if not (text.startswith(upto) and upto.startswith(before)):
                    spans = ("the chat template does not render a conversation turn by turn (prefixes differ), so "
                             "assistant turns cannot be located; use data_format text or train_on_prompt true")  # fmt: skip
                    break
                spans.append((len(before), len(upto)))
            if isinstance(spans, str):
                out.append(spans)
            else:
                out.append(Rendered(text, [(0, len(text))] if self.train_on_prompt else spans, True, False))
        return out

    def _apply(self, convs: list[list[dict]], gen: bool) -> list:
        """The chat template on every conversation (one batched call); where that fails, one by one,
        each failure kept as its exception (templates raise whatever they like).

        transformers' `render_jinja_template` is what `apply_chat_template(tokenize=False)` runs once
        it has turned message objects into plain dicts, which these messages already are; calling it
        directly saves a quarter of the rendering time and gives the same text."""
        if not convs:
            return []
        t = self.tok.get_chat_template() if self.template else CHATML
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # an older transformers: the same through apply_chat_template
            render_jinja_template = None

        def apply(batch):
            if render_jinja_template is None:
                return self.tok.apply_chat_template(batch, tokenize=False, add_generation_prompt=gen, chat_template=t)
            return render_jinja_template(batch, chat_template=t, add_generation_prompt=gen, **self.tok.special_tokens_map)[0]

        try:
            return list(apply(convs))
        except Exception:  # noqa: BLE001
            out = []
            for c in convs:
                try:
                    out.append(apply([c])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    def _plain(self, prompt: str, completion: str) -> Rendered:
        text = prompt + completion
        start = 0 if self.train_on_prompt else len(prompt)
        return Rendered(text, [(start, len(text))], False, True)


# ---- tokenizing --------------------------------------------------------------------------------


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


# ---- rows and batches --------------------------------------------------------------------------


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
