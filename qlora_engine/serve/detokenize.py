"""Token ids to text as they arrive, with OpenAI's `stop` strings.

Decoding each new token alone would break words and multi-byte characters, and decoding the whole
answer every step costs O(n) a token. `TextStream` decodes a short window instead: the tokens since
the last complete piece of text, against the same window without the new token (the incremental
detokenization of text-generation-inference and vLLM). Text ending in an incomplete UTF-8 sequence
waits for the next token. Text that could be the start of a stop string is held back until it
either becomes the stop string (the answer ends before it) or cannot any more. Touches nothing.
"""

from __future__ import annotations


class TextStream:
    """Feed token ids with `add` (returns the text now safe to send), end with `finish`."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are settled text
        self.read = 0  # tokens up to here are in `text`
        self.text = ""  # the answer so far (cut before a stop string once one is found)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is left, incomplete characters included (no more tokens will come)."""
        if self.read < len(self.ids) and not self.stopped:
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped, final = self.text[: min(hits)], True, True
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
