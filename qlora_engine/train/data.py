"""Training data: local files, a saved dataset, a hub dataset or the caller's own records -> rendered text with trainable spans -> token ids
and shifted targets -> rows (packed or not) -> micro-batches in a seeded, resumable order.

Every format is rendered to one string plus the character spans the loss is computed on (the
completion, or the assistant turns); one tokenization with offsets then marks each token trainable
or masked. Targets are shifted here (`targets[t]` is the token after position t), so a packed row
never asks one sample to predict the next one's first token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

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


class DataError(InputError):
    """Bad data or a data setting that does not fit it; the message says what to change."""


EVAL_SPLITS = ("validation", "test", "train")  # the split of eval data when none is named, in this order


def load_records(spec: str, split: str | None = "train", subset: str | None = None):
    """A `datasets.Dataset` from a file, a `save_to_disk` directory, a hub dataset id
    (`org/name[@revision]`, with `subset`), or "demo". `split` picks one of several splits (a hub
    dataset, a saved DatasetDict); None: the first of validation, test, train (for eval data)."""
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
        return _empty_check(_pick(_hub_dataset(*hub, subset), split, spec), spec)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a directory it cannot read
            raise DataError(f"{path} is not a datasets.save_to_disk directory ({type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick(ds, split, spec)
        return _empty_check(ds, spec)
    kind = _SUFFIX_KIND.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    if kind == "json":
        check_json(path)
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise DataError(f"{path}: could not read it as {kind} ({str(e).splitlines()[0][:200]})") from None
    return _empty_check(ds, spec)


def check_json(path: Path) -> None:
    """A one-line DataError naming the first bad line (counted from 1) of a JSON Lines file, or of a
    .json file (one JSON array of objects, or JSON Lines), before datasets reads it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path} holds no samples: give a data file with at least one sample")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one value: JSON Lines in a .json file
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix that line") from None
        else:
            items = data if isinstance(data, list) else [data]
            bad = next((i for i, r in enumerate(items) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"{path}: item {bad + 1} is a {type(items[bad]).__name__}, not an object of fields; each "
                                "sample must be a JSON object")  # fmt: skip
            return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); fix or remove line {n}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a sample must be a JSON object of fields, got a {type(record).__name__}")


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


def _hub_dataset(repo: str, revision: str | None, subset: str | None):
    """Every split of `datasets.load_dataset(repo, subset)`: from the hub, or offline from datasets'
    cache; when neither has it, from the repository's files in huggingface_hub's cache (where a
    pre-populated cache or an earlier `hf download` puts them)."""
    import datasets

    from ..models.hub import snapshot

    what = f"{repo}{'@' + revision if revision else ''}"
    try:
        try:
            return datasets.load_dataset(repo, name=subset, revision=revision)
        except (ConnectionError, FileNotFoundError):
            local = snapshot(repo, revision, ["*"], repo_type="dataset")
            return datasets.load_dataset(str(local), name=subset)
    except InputError:
        raise
    except (ValueError, KeyError) as e:  # an unknown subset: datasets names the ones there are
        raise DataError(f"hub dataset {what}: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for an unreadable repository
        raise DataError(f"hub dataset {what} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


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


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system", "bot": "assistant"}  # fmt: skip


def _messages(record) -> list[dict]:
    raw = record.get("messages") or record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise DataError("a chat sample needs a non-empty 'messages' list of {role, content}")
    out = []
    for m in raw:
        role = _ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
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

    def _chat(self, messages: list[dict]) -> Rendered:
        t = self.template or CHATML

        def apply(msgs, gen=False):
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=t)

        full = apply(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = apply(messages[:i], gen=True), apply(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError("the chat template does not render a conversation turn by turn (prefixes differ), so "
                                "assistant turns cannot be located; use data_format text or train_on_prompt true")  # fmt: skip
            spans.append((len(before), len(upto)))
        if not spans:
            raise DataError("a chat sample has no assistant message to learn from")
        return Rendered(full, [(0, len(full))] if self.train_on_prompt else spans, True, False)

    def __call__(self, record) -> Rendered:
        if self.fmt == "chat":
            return self._chat(_messages(record))
        if self.fmt == "alpaca":
            instr, inp, out = str(record["instruction"]), str(record.get("input") or ""), str(record["output"])
            if self.template:
                user = instr + (f"\n\n{inp}" if inp else "")
                return self._chat([{"role": "user", "content": user}, {"role": "assistant", "content": out}])
            prompt = ALPACA.format(ctx=", paired with an input that provides further context" if inp else "",
                                   instruction=instr, input=f"### Input:\n{inp}\n\n" if inp else "")  # fmt: skip
            return self._plain(prompt, out)
        if self.fmt == "prompt_completion":
            return self._plain(str(record["prompt"]), str(record["completion"]))
        return self._plain("", str(record["text"]))

    def _plain(self, prompt: str, completion: str) -> Rendered:
        text = prompt + completion
        start = 0 if self.train_on_prompt else len(prompt)
        return Rendered(text, [(start, len(text))], False, True)


@dataclass
class Sample:
    ids: list[int]
    targets: list[int]  # targets[t] = the token after position t, or IGNORE


@dataclass
class Tokenized:
    samples: list[Sample]
    total: int = 0
    truncated: int = 0
    dropped: int = 0  # no trainable token left after truncation
    first_dropped: int | None = None  # its sample number, counted from 1

    @property
    def trainable_tokens(self) -> int:
        return sum(sum(t != IGNORE for t in s.targets) for s in self.samples)

    def summary(self) -> str:
        first = f" (nothing to train on; the first is sample {self.first_dropped})" if self.dropped else ""
        return (f"{len(self.samples)} samples, {sum(len(s.ids) for s in self.samples)} tokens "
                f"({self.trainable_tokens} trained on); {self.truncated} of {self.total} truncated to seq_len, "
                f"{self.dropped} dropped{first}")  # fmt: skip

    def drop(self, i: int) -> None:
        self.dropped += 1
        if self.first_dropped is None:
            self.first_dropped = i + 1


def _pretokenized(records, seq_len: int) -> Tokenized:
    """Records that are token ids already: `input_ids`, and optional `labels` aligned with them
    (transformers' convention: -100 where no loss is taken; the shift happens here)."""
    out = Tokenized([], total=len(records))
    for i in range(len(records)):
        r = records[i]
        ids, labels = list(r["input_ids"]), r.get("labels")
        labels = ids if labels is None else list(labels)
        if len(labels) != len(ids) or not all(isinstance(t, int) for t in ids):
            raise DataError(f"sample {i + 1}: input_ids must be whole numbers, and labels (when given) as long as input_ids")
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            out.truncated += 1
        targets = labels[1:] + [IGNORE]
        if all(t == IGNORE for t in targets):
            out.drop(i)
            continue
        out.samples.append(Sample(ids, targets))
    return out


def _render(renderer: Renderer, records, i: int, source: str) -> Rendered:
    try:
        return renderer(records[i])
    except DataError as e:
        raise DataError(f"{source}: sample {i + 1}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{source}: sample {i + 1} does not fit the {renderer.fmt} format ({type(e).__name__}: {e}); "
                        "fix it or set data_format") from None  # fmt: skip


def tokenize(records, renderer: Renderer, seq_len: int, batch: int = 512, source: str = "data") -> Tokenized:
    """Render and tokenize every record; samples left with nothing to train on are counted (and
    the first named), errors name the sample (counted from 1)."""
    if renderer.fmt == "tokens":
        return _pretokenized(records, seq_len)
    tok = renderer.tok
    eos = tok.eos_token_id
    out = Tokenized([], total=len(records))
    for start in range(0, len(records), batch):
        chunk = [(i, _render(renderer, records, i, source)) for i in range(start, min(start + batch, len(records)))]
        for templated in (True, False):
            group = [(i, r) for i, r in chunk if r.templated == templated]
            if not group:
                continue
            enc = tok([r.text for _, r in group], add_special_tokens=not templated, return_offsets_mapping=True)
            for (i, r), ids, offsets in zip(group, enc["input_ids"], enc["offset_mapping"]):
                keep = [any(s < b and e > a for a, b in r.spans) and e > s for s, e in offsets]
                if r.add_eos and eos is not None and (not ids or ids[-1] != eos):
                    ids, keep = ids + [eos], keep + [True]
                if len(ids) > seq_len:
                    ids, keep = ids[:seq_len], keep[:seq_len]
                    out.truncated += 1
                targets = [t if k else IGNORE for t, k in zip(ids[1:], keep[1:])] + [IGNORE]
                if all(t == IGNORE for t in targets):
                    out.drop(i)
                    continue
                out.samples.append(Sample(list(ids), targets))
    return out


@dataclass
class Row:
    ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        self.ids += s.ids
        self.targets += s.targets
        self.positions += list(range(len(s.ids)))


def make_rows(samples: list[Sample], seq_len: int, packing: bool) -> list[Row]:
    """Packed: first-fit-decreasing into rows of at most seq_len tokens. Unpacked: one sample per row."""
    rows: list[Row] = []
    if not packing:
        for s in samples:
            r = Row()
            r.add(s)
            rows.append(r)
        return rows
    space: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].ids)):
        s = samples[i]
        for j, free in enumerate(space):
            if len(s.ids) <= free:
                rows[j].add(s)
                space[j] -= len(s.ids)
                break
        else:
            r = Row()
            r.add(s)
            rows.append(r)
            space.append(seq_len - len(s.ids))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Pad tokens get their own position run (so packed-row detection treats
    them as a separate sequence) and IGNORE targets; causal attention keeps real tokens from
    seeing them, so no attention mask is needed."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        targets[i, :n] = torch.tensor(r.targets)
        pos[i, :n] = torch.tensor(r.positions)
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "targets": targets, "position_ids": pos}


class Batches:
    """Micro-batches in a seeded order that differs per epoch; a position is (epoch, index)."""

    def __init__(self, rows: list[Row], batch_size: int, seed: int, pad_id: int):
        if not rows:
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


def eval_batches(rows: list[Row], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


@dataclass
class Prepared:
    train: Tokenized
    eval: Tokenized
    fmt: str
    renderer: Renderer
    eval_records: object


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


def prepare(cfg, tokenizer, train_records=None, eval_records=None) -> Prepared:
    """Load, split, render and tokenize train and eval data per the config. `train_records` /
    `eval_records` (a datasets.Dataset or a list of dicts) replace cfg.data / cfg.eval_data."""
    if train_records is not None:
        records, source = as_dataset(train_records), "the given data"
    else:
        records, source = load_records(cfg.data, cfg.data_split, cfg.data_subset), cfg.data
    fmt = detect_format(records.column_names) if cfg.data_format == "auto" else cfg.data_format
    if cfg.data_format != "auto":
        detect = {"chat": {"messages", "conversations"}, "alpaca": {"instruction"}, "prompt_completion": {"prompt"},
                  "text": {"text"}, "tokens": {"input_ids"}}  # fmt: skip
        if not detect[fmt] & set(records.column_names):
            raise DataError(f"data_format {fmt} does not fit columns {records.column_names}")
    eval_spec = cfg.eval_data or (str(DEMO_EVAL) if cfg.data == "demo" and train_records is None else None)
    if eval_records is not None:
        eval_records, train_records, eval_source = as_dataset(eval_records), records, "the given eval data"
    elif eval_spec:
        eval_records = load_records(eval_spec, cfg.eval_split, cfg.data_subset)
        train_records, eval_source = records, eval_spec
    else:
        if len(records) < 2:
            raise DataError(f"{source} has {len(records)} sample(s): too few to hold some out; give eval_data")
        split = records.train_test_split(test_size=max(1, round(cfg.eval_fraction * len(records))), seed=cfg.seed)
        train_records, eval_records = split["train"], split["test"]
        eval_source = f"{source} (the held-out part)"
    if cfg.max_samples:
        train_records = train_records.select(range(min(cfg.max_samples, len(train_records))))
    renderer = Renderer(tokenizer, fmt, cfg.train_on_prompt)
    seq_len = int(cfg.seq_len)
    train = tokenize(train_records, renderer, seq_len, source=source)
    evals = tokenize(eval_records, renderer, seq_len, source=eval_source)
    for what, t, src in (("training", train, source), ("eval", evals, eval_source)):
        if not t.samples:
            raise DataError(f"{src}: none of its {t.total} {what} samples has a token to train on (the first is sample "
                            f"{t.first_dropped}): an empty completion or assistant turn, or one past seq_len {seq_len}; "
                            "check the columns and data_format, or set train_on_prompt: true")  # fmt: skip
    return Prepared(train, evals, fmt, renderer, eval_records)


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
