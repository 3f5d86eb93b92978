"""Progress of the long steps (loading, quantizing, training, exporting), for people and for logs.

On a terminal, a tqdm bar on stderr. Anywhere else (CI logs, `nohup`, a pipe) a bar would either
be silent or flood the log with carriage returns, so a plain line goes to stderr instead: every
`every` items, and at most every `interval` seconds otherwise, with the rate and an ETA.
`QLORA_ENGINE_PROGRESS=bar|lines|off` overrides the choice. `quiet_third_party()` turns the
progress bars of transformers, datasets and huggingface_hub off when stderr is not a terminal.
Touches nothing but stderr.
"""

from __future__ import annotations

import os
import sys
import time


def mode() -> str:
    """'bar', 'lines' or 'off'."""
    forced = os.environ.get("QLORA_ENGINE_PROGRESS", "").lower()
    if forced in ("bar", "lines", "off"):
        return forced
    return "bar" if sys.stderr.isatty() else "lines"


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts items of one long step; `update(n, **fields)` after each, `close()` at the end.

    `fields` are shown beside the count (loss=..., tok_s=...). In line mode a line is printed when
    `every` items have passed since the last one (when given) or `interval` seconds have, and at
    the end; `write()` prints a message without breaking a bar.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, every: int | None = None,
                 interval: float = 10.0, enabled: bool = True):  # fmt: skip
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.interval = every, interval
        self.mode = mode() if enabled else "off"
        self.fields: dict = {}
        self.t0 = self.last_t = time.monotonic()
        self.start_n = self.last_n = initial
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self.fields = fields
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            due = (self.every and self.n - self.last_n >= self.every) or (not self.every and now - self.last_t >= self.interval)
            if due or (self.total is not None and self.n >= self.total):
                self._line(now)

    def _line(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", ETA {_duration((self.total - self.n) / rate)}"
        extra = "".join(f", {k} {_fmt(v)}" for k, v in self.fields.items())
        print(f"{self.desc}: {done} {self.unit}{pct}{extra}, elapsed {_duration(now - self.t0)}{eta}", file=sys.stderr,
              flush=True)  # fmt: skip
        self.last_t, self.last_n = now, self.n

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.n != self.last_n:
            self._line(time.monotonic())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def quiet_third_party() -> None:
    """No progress bars from transformers, datasets and huggingface_hub unless on a terminal."""
    if mode() == "bar":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
