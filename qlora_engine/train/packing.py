"""Packing samples into rows of at most seq_len tokens, and rows read back from flat token arrays.

`first_fit_decreasing` gives exactly the rows of the textbook loop (each sample, longest first and
ties by index, goes to the lowest-numbered row with room) without its O(samples x rows) scan: the
samples of one length are placed together, with numpy, so the cost is O(distinct lengths x rows),
at most seq_len x rows. A row is a list of sample indices; `RowView` assembles one from the
memory-mapped arrays of a prepared dataset when a batch needs it, with each sample's positions
restarting at 0 (the varlen attention keeps packed samples apart by them). Touches numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import mmap

import numpy as np


@dataclass
class Row:
    ids: list[int] | np.ndarray = field(default_factory=list)
    targets: list[int] | np.ndarray = field(default_factory=list)
    positions: list[int] | np.ndarray = field(default_factory=list)

    def add(self, s) -> None:
        """Append a sample (list-built rows: `make_rows`, the planner's validation)."""
        self.ids += list(s.ids)
        self.targets += list(s.targets)
        self.positions += list(range(len(s.ids)))


def first_fit_decreasing(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_offsets [rows + 1], members [n]): row r holds the samples members[row_offsets[r]:row_offsets[r + 1]],
    in the order they were placed. Deterministic; every length must be in 1..capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    if lengths.min() < 1 or lengths.max() > capacity:
        raise ValueError(f"sample lengths must be in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable")  # the placing order: longest first, ties by index
    placed = lengths[order]
    row_of = np.empty(n, np.int64)  # the row of the sample placed p-th
    free = np.empty(n, np.int64)  # room left in each row opened so far (at most one row per sample)
    rows = 0
    starts = np.concatenate([[0], np.flatnonzero(np.diff(placed)) + 1, [n]])
    for a, b in zip(starts[:-1], starts[1:]):
        size, k = int(placed[a]), int(b - a)
        # One sample after another, first fit puts each into the lowest-numbered row with room: the
        # rows that have room for this size, in order, each taking as many as fit, then new rows.
        fit = np.flatnonzero(free[:rows] >= size)
        if len(fit):
            take = free[fit] // size
            upto = np.cumsum(take)
            used = int(np.searchsorted(upto, k))  # rows fit[:used + 1] absorb the group (or all of them)
            if used < len(fit):
                take = take[: used + 1].copy()
                take[-1] -= upto[used] - k
                fit = fit[: used + 1]
            row_of[a : a + int(take.sum())] = np.repeat(fit, take)
            free[fit] -= take * size
            a += int(take.sum())
            k = int(b - a)
        if k:
            per_row = capacity // size
            new = -(-k // per_row)
            counts = np.full(new, per_row, np.int64)
            counts[-1] = k - per_row * (new - 1)
            row_of[a:b] = np.repeat(np.arange(rows, rows + new), counts)
            free[rows : rows + new] = capacity - counts * size
            rows += new
    by_row = np.argsort(row_of, kind="stable")  # within a row: the order the samples were placed in
    members = order[by_row]
    row_offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=row_offsets[1:])
    return row_offsets, members


def one_per_row(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_offsets, members) of unpacked rows: sample i alone in row i."""
    return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)


def pack(lengths, capacity: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    return first_fit_decreasing(lengths, capacity) if packing else one_per_row(len(lengths))


def segment_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The flat indices of the segments [starts[i], starts[i] + lengths[i]), concatenated in order."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    begin = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=begin[1:])
    return np.repeat(np.asarray(starts, np.int64) - begin, lengths) + np.arange(total)


def positions(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each segment, concatenated: the position ids of a packed row."""
    lengths = np.asarray(lengths, np.int64)
    begin = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=begin[1:])
    return np.arange(int(lengths.sum())) - np.repeat(begin, lengths)


def _shared_bytes() -> int:
    """File-backed (and shared) pages resident in this process, from /proc/self/statm; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


class RowView(Sequence):
    """Rows over flat arrays: `ids`/`targets` hold every sample's tokens back to back, sample s is
    [offsets[s], offsets[s + 1]), and row r is the samples members[row_offsets[r]:row_offsets[r + 1]].
    The arrays may be memory-mapped: a row is read when it is asked for, and `release()` (which
    unmaps the pages read so far) is called whenever the file pages mapped into this process have
    grown by `release_every` bytes, so that reading an epoch does not leave the whole cache
    counted in the process's RSS. (Each sample read maps its pages, and the kernel maps the pages
    around a fault too, so what a read costs in RSS is measured, not estimated.)"""

    def __init__(self, ids, targets, offsets, members, row_offsets, release=None, release_every: int = 128 << 20):
        self.ids, self.targets, self.offsets = ids, targets, offsets
        self.members, self.row_offsets = members, row_offsets
        self.release, self.release_every, self.reads = release, release_every, 0
        self.mapped_at_start = _shared_bytes() if release is not None else 0

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def samples_of(self, r: int) -> np.ndarray:
        return np.asarray(self.members[self.row_offsets[r] : self.row_offsets[r + 1]])

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        m = self.samples_of(r % len(self))
        starts = np.asarray(self.offsets[m])
        lengths = np.asarray(self.offsets[m + 1]) - starts
        idx = segment_index(starts, lengths)
        row = Row(np.asarray(self.ids[idx]), np.asarray(self.targets[idx]), positions(lengths))
        self.reads += 1
        if self.release is not None and self.reads % 16 == 0 and _shared_bytes() - self.mapped_at_start > self.release_every:
            self.release()
        return row

    def tokens(self) -> int:
        """Real (non-pad) tokens in all rows."""
        m = np.asarray(self.members)
        return int((np.asarray(self.offsets[m + 1]) - np.asarray(self.offsets[m])).sum())
