"""The data cache: entries appear whole or not at all, are read memory-mapped, and a damaged one is
not taken for a good one."""

import json
import mmap
import os

import numpy as np
import pytest

from qlora_engine.train import datacache


def fill_with(ids, lengths, fail=False):
    def fill(writer, tmp):
        (tmp / "scratch").mkdir()  # scratch space is removed before the entry appears
        (tmp / "scratch" / "x").write_text("x")
        writer.add(np.asarray(ids), np.asarray(ids) + 1, lengths, np.arange(len(lengths)), np.asarray(lengths) - 1,
                   np.zeros(len(lengths), np.int8))  # fmt: skip
        if fail:
            raise KeyboardInterrupt  # a build killed halfway
        return {"records": len(lengths)}

    return fill


def test_an_entry_is_written_whole_and_read_memory_mapped(tmp_path):
    store = datacache.build(tmp_path / "k", fill_with(range(10), [4, 6]))
    assert isinstance(store.ids.base.obj, mmap.mmap) and store.ids.tolist() == list(range(10))
    assert store.offsets.tolist() == [0, 4, 10] and store.lengths.tolist() == [4, 6] and store.samples == 2
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == sorted([f"{n}.bin" for n in datacache.ARRAYS] + ["meta.json"])
    again = datacache.Store.open(tmp_path / "k")
    assert again.meta["records"] == 2 and again.targets.tolist() == list(range(1, 11))


def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        datacache.build(tmp_path / "k", fill_with(range(10), [4, 6], fail=True))
    assert list(tmp_path.iterdir()) == [] and datacache.Store.open(tmp_path / "k") is None


def test_a_damaged_or_older_entry_is_not_read(tmp_path):
    datacache.build(tmp_path / "k", fill_with(range(10), [4, 6]))
    with open(tmp_path / "k" / "ids.bin", "r+b") as f:
        f.truncate(8)  # a file cut short
    assert datacache.Store.open(tmp_path / "k") is None
    datacache.build(tmp_path / "k", fill_with(range(3), [3]))  # rebuilt in place
    meta = json.loads((tmp_path / "k" / "meta.json").read_text())
    (tmp_path / "k" / "meta.json").write_text(json.dumps(meta | {"version": -1}))
    assert datacache.Store.open(tmp_path / "k") is None


def test_row_tables_are_made_once(tmp_path):
    store = datacache.build(tmp_path / "k", fill_with(range(10), [4, 6]))
    calls = []

    def make():
        calls.append(1)
        return np.array([0, 1, 2]), np.array([1, 0]), {"rows": 2}

    a = datacache.rows(store, "x", make)
    b = datacache.rows(store, "x", make)
    assert len(calls) == 1 and a[0].tolist() == b[0].tolist() == [0, 1, 2] and b[1].tolist() == [1, 0]
    assert isinstance(b[1].base.obj, mmap.mmap) and b[2]["rows"] == 2


def test_keys_and_digests():
    assert datacache.digest({"a": 1, "b": 2}) == datacache.digest({"b": 2, "a": 1}) != datacache.digest({"a": 2, "b": 2})


def test_the_default_root_follows_hf_datasets_cache(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    assert datacache.root_of(None) == tmp_path / "hf" / "qlora_engine"
    assert datacache.root_of(str(tmp_path / "mine")) == tmp_path / "mine"
    assert os.fspath(datacache.default_root()).endswith("qlora_engine")


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssFile:"))


def test_pages_read_leave_the_rss_when_dropped(tmp_path):
    """An epoch reads every page of the cache; dropping them keeps the process's RSS small (they
    stay in the page cache for the next read)."""
    n = 8 << 20  # 32 MiB of int32 tokens
    store = datacache.build(tmp_path / "k", fill_with(np.arange(n, dtype=np.int32), [n]))
    before = _rss_file()
    assert int(store.ids[::1024].sum()) == int(np.arange(n)[::1024].sum())  # touches every page
    read = _rss_file() - before
    store.drop_pages()
    dropped = _rss_file() - before
    assert read > 24 << 20 and dropped < 4 << 20, (read, dropped)
    assert store.ids[n - 1] == n - 1  # still readable after
