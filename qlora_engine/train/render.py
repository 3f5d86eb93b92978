"""Formats: a record -> one rendered string plus the character spans the loss is computed on.
Detected from the columns (chat `messages`, alpaca, prompt/completion, raw text, already tokenized);
chat through the tokenizer's chat template (ChatML when it has none), each assistant turn located by
rendering its prefix. The second stage of `data`; touches nothing but the tokenizer's template.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sources import DataError, _first_line

# Used when data is in chat form but the tokenizer has no chat template of its own.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n{input}### Response:\n")  # fmt: skip


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


