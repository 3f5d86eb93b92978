"""The layout of the batch the next forward runs, shared by the layers that treat rows apart.

`Rows.slots`: each row's adapter slot (0: none), read by every `MultiLoraLinear`. `Rows.starts`:
in a prefill, where each row's prompt starts (prompts are left-padded to the longest; the padding
is never attended to and its outputs are dropped), read by the per-row rotary embedding; None in a
decode step, where every row holds one real token. The engine sets both before each forward.
Touches nothing.
"""

from __future__ import annotations


class Rows:
    def __init__(self):
        self.slots: list[int] = []
        self.starts: list[int] | None = None

    def set(self, slots: list[int], starts: list[int] | None = None) -> None:
        self.slots, self.starts = list(slots), (list(starts) if starts is not None else None)
