"""Packing: exactly the rows of the textbook first-fit-decreasing loop, at any size in well under
a second per million samples; rows read back from flat arrays with positions restarting per sample."""

import time

import numpy as np
import pytest

from qlora_engine.train import packing


def textbook_ffd(lengths, capacity):
    """The O(samples x rows) loop the engine used to run: longest first, ties by index, first row with room."""
    rows, space = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for j, free in enumerate(space):
            if lengths[i] <= free:
                rows[j].append(i)
                space[j] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_decreasing_equals_the_textbook_loop(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        capacity = int(rng.integers(8, 300))
        n = int(rng.integers(1, 400))
        # uniform lengths, and skewed ones (many short samples, a few long: real SFT data)
        lengths = rng.integers(1, capacity + 1, n) if seed % 2 else np.minimum(capacity, rng.geometric(0.08, n))
        row_offsets, members = packing.first_fit_decreasing(lengths, capacity)
        got = [members[row_offsets[r] : row_offsets[r + 1]].tolist() for r in range(len(row_offsets) - 1)]
        assert got == textbook_ffd(lengths.tolist(), capacity)


def test_packing_a_million_samples_is_fast_and_full():
    lengths = np.minimum(2048, np.random.default_rng(0).lognormal(4.5, 0.6, 1_000_000).astype(np.int64) + 1)
    t = time.perf_counter()
    row_offsets, members = packing.first_fit_decreasing(lengths, 2048)
    took = time.perf_counter() - t
    assert sorted(members.tolist()) == list(range(len(lengths)))  # every sample once
    fill = np.add.reduceat(lengths[members], row_offsets[:-1])
    assert fill.max() <= 2048 and lengths.sum() / (len(fill) * 2048) > 0.99
    assert took < 10, f"packing 1M samples took {took:.1f} s"  # the textbook loop: hours
    print(f"\n[packing] 1M samples into {len(fill)} rows in {took:.2f} s, {100 * lengths.sum() / (len(fill) * 2048):.2f}% full")


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="lengths must be in 1..8"):
        packing.first_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError):
        packing.first_fit_decreasing([0, 2], 8)
    assert [a.tolist() for a in packing.first_fit_decreasing([], 8)] == [[0], []]


def test_row_view_reads_rows_with_positions_restarting_per_sample():
    lengths = np.array([3, 5, 2, 4])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.arange(100, 100 + lengths.sum())
    targets = ids + 1000
    row_offsets, members = packing.first_fit_decreasing(lengths, 8)
    view = packing.RowView(ids, targets, offsets, members, row_offsets)
    assert len(view) == 2 and view.tokens() == lengths.sum()
    row = view[0]  # samples 1 (5 tokens) and 0 (3 tokens), in the order they were placed
    assert row.ids.tolist() == list(range(103, 108)) + list(range(100, 103))
    assert row.targets.tolist() == (row.ids + 1000).tolist()
    assert row.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert [r.positions.tolist() for r in view[1:]] == [[0, 1, 2, 3, 0, 1]]
    assert packing.one_per_row(3)[0].tolist() == [0, 1, 2, 3]


def test_row_view_releases_pages_as_it_reads(tmp_path):
    """Reading rows maps file pages into the process; past release_every they are released, so the
    RSS of an epoch stays bounded whatever the file's size."""
    import mmap

    n = 4 << 20  # 16 MiB of int32 tokens, 4096 samples of 1024
    (np.arange(n, dtype=np.int32)).tofile(tmp_path / "ids.bin")
    with open(tmp_path / "ids.bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    ids = np.frombuffer(mm, dtype=np.int32)
    lengths = np.full(4096, 1024)
    offsets = np.arange(0, n + 1, 1024)
    row_offsets, members = packing.first_fit_decreasing(lengths, 1024)
    calls = []

    def release():
        calls.append(1)
        mm.madvise(mmap.MADV_DONTNEED)

    view = packing.RowView(ids, ids, offsets, members, row_offsets, release=release, release_every=2 << 20)
    for i in range(len(view)):
        assert view[i].ids[0] == 1024 * members[i]
    assert len(calls) >= 3  # 16 MiB read, released every 2 MiB (checked every 16 rows)
