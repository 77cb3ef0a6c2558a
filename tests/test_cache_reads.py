"""On-demand token reads (`partial` tower's hot path) through the memory map of the cache file: the
same rows as HDF5 returns, for unsorted, repeated and empty row sets, with no HDF5 selection; the
fallbacks (filtered datasets, unaligned chunks) and pickling."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from pixelrec.encode import cache_reader
from pixelrec.encode.cache import _MappedRows, open_cache
from test_cache import N, T, W, _data, _write

ROW_SETS = (np.array([5, 3, 3, 299, 0, 5]), np.array([250, 7]), np.arange(40, 10, -1), np.arange(N),
            np.array([], np.int64), np.random.default_rng(0).integers(0, N, 500))


def test_on_demand_tokens_come_from_the_memory_map_exactly(tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    _write(out)
    _, tok = _data()
    cache = open_cache(out)
    assert cache._token_map is not None and cache._token_map.rows_at is not None

    def no_hdf5(*args):
        raise AssertionError("an HDF5 selection on the hot path")

    monkeypatch.setattr(cache_reader, "_gather", no_hdf5)
    for rows in ROW_SETS:
        got = cache.read_tokens(rows)
        assert got.dtype == np.float16 and got.shape == (len(rows), T, W)
        assert np.array_equal(got, tok[rows])
    for bad in (np.array([0, N]), np.array([-1])):
        with pytest.raises(IndexError):
            cache.read_tokens(bad)


def test_the_row_by_row_copy_gives_the_same_rows(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    _, tok = _data()
    mapped = open_cache(out)._token_map
    mapped.rows_at = None  # the path taken when a chunk's byte offset is not a multiple of the item size
    for rows in ROW_SETS:
        assert np.array_equal(mapped.gather(rows), tok[rows])


def test_compressed_tokens_are_read_through_hdf5(tmp_path):
    path = tmp_path / "z.h5"
    data = np.random.default_rng(1).standard_normal((50, T, W)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=data, chunks=(4, T, W), compression="gzip")
        f.create_dataset("plain", data=data, chunks=(4, T, W))
        f.create_dataset("contiguous", data=data)
    with h5py.File(path, "r") as f:
        assert _MappedRows.of(path, f["tokens"]) is None
        assert _MappedRows.of(path, f["contiguous"]) is None  # not chunked: HDF5 reads it
        mapped = _MappedRows.of(path, f["plain"])
        rows = np.array([49, 0, 0, 17, 4, 3])
        assert np.array_equal(mapped.gather(rows), data[rows])


def test_a_pickled_cache_maps_the_file_again(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    _, tok = _data()
    cache = open_cache(out)
    rows = np.array([9, 1, 9])
    assert np.array_equal(cache.read_tokens(rows), tok[rows])  # the map exists now
    state = cache.__getstate__()
    assert "_token_map" not in state
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.read_tokens(rows), tok[rows]) and clone._token_map is not None


def test_per_layer_states_come_from_the_memory_map_exactly(tmp_path, monkeypatch):
    """`read_hidden` (the side tower's reads without --cache-in-memory) takes the tokens' path: the
    rows of an encoded cache's `hidden` dataset straight from a memory map, equal to HDF5's."""
    from fixtures_runs import hidden_settings_cache

    cache = open_cache(hidden_settings_cache())
    with h5py.File(cache.path, "r") as f:
        stored = f["hidden"][:]
    assert cache._hidden_map is not None and "_hidden_map" not in cache.__getstate__()
    monkeypatch.setattr(cache_reader, "_gather", lambda *a: pytest.fail("an HDF5 selection on the hot path"))
    n = len(cache)
    for rows in (np.array([n - 1, 0, 0, 3]), np.arange(n)[::-1], np.array([], np.int64)):
        got = cache.read_hidden(rows)
        assert got.dtype == stored.dtype and np.array_equal(got, stored[rows])
    with pytest.raises(IndexError):
        cache.read_hidden(np.array([n]))
