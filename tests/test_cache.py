"""The HDF5 embedding cache: writer bookkeeping, partial files, chunked reads, compatibility checks."""

from __future__ import annotations

import errno
import pickle

import h5py
import numpy as np
import pytest
import torch

from pixelrec.encode.cache import CacheWriter, open_cache, partial_path
from pixelrec.encode.encoder import TINY_MODEL, EncoderConfig, build_encoder
from pixelrec.errors import PixelrecError

N, E, T, W = 300, 8, 5, 4
IDS = [f"i{n:04d}" for n in range(N)]
ATTRS = dict(model="m", pretrained="none", pooling="model", preset="default", image_size=32, dim=E,
             split_block=0, embedding_dtype="float16", normalized=False, n_catalogue=N + 2)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, E)).astype(np.float16), rng.standard_normal((N, T, W)).astype(np.float16)


def _write(out, batches=(100, 100, 100), tokens: bool = True, finish: bool = True):
    emb, tok = _data()
    writer = CacheWriter.create(out, dict(ATTRS, split_block=2 if tokens else 0), dim=E,
                                embedding_dtype=np.dtype(np.float16), token_shape=(T, W) if tokens else None)
    start = position = 0
    for size in batches:
        sl = slice(start, start + size)
        failures = [("bad1", "zero-byte file")] if start == 0 else []
        position += size + len(failures)
        writer.append(IDS[sl], emb[sl], tok[sl] if tokens else None, failures, positions_done=position)
        start += size
    if finish:
        writer.append([], np.empty((0, E), np.float16), None, [("bad2", "missing")], positions_done=N + 2)
        writer.finish()
    return writer, emb, tok


def test_round_trip_layout(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    assert out.exists() and not partial_path(out).exists()
    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].chunks[0] == 256
        assert f["tokens"].shape == (N, T, W) and f["tokens"].chunks[0] <= 16
        assert h5py.check_string_dtype(f["item_ids"].dtype).encoding == "utf-8"
        assert bool(f.attrs["complete"]) and f.attrs["n_rows"] == N
    with open_cache(out) as cache:
        emb, tok = _data()
        assert list(cache.item_ids) == IDS and len(cache) == N and cache.dim == E
        assert cache.has_tokens and cache.split_block == 2 and cache.token_shape == (T, W)
        assert cache.failed == {"bad1": "zero-byte file", "bad2": "missing"}
        assert cache.attrs["model"] == "m" and cache.attrs["embedding_dtype"] == "float16"
        full = cache.load_embeddings()
        assert full.dtype == np.float32 and np.array_equal(full, emb.astype(np.float32))


@pytest.mark.parametrize("in_memory", [False, True])
def test_reads_arbitrary_rows(tmp_path, in_memory):
    out = tmp_path / "c.h5"
    _write(out)
    emb, tok = _data()
    cache = open_cache(out, in_memory=in_memory)
    for rows in (np.array([5, 3, 3, 299, 0, 5]), np.array([250, 7]), np.arange(40, 10, -1), np.array([], np.int64)):
        got = cache.read_embeddings(rows)
        assert got.dtype == np.float32 and got.shape == (len(rows), E)
        assert np.array_equal(got, emb[rows].astype(np.float32))
        assert np.array_equal(cache.read_tokens(rows), tok[rows])
    with pytest.raises(IndexError):
        cache.read_embeddings(np.array([0, N]))
    assert cache.rows_for(["i0007", "nope", "i0000"]).tolist() == [7, -1, 0]
    assert cache.index["i0299"] == 299
    cache.close()


def test_pickled_cache_reopens(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    cache = open_cache(out)
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.read_embeddings(np.array([9, 1])), cache.read_embeddings(np.array([9, 1])))


def test_open_cache_refuses_partial_and_foreign_files(tmp_path):
    out = tmp_path / "c.h5"
    writer, _, _ = _write(out, batches=(100,), finish=False)
    writer.close()
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(PixelrecError, match=f"{out} is incomplete: rerun the same encode command to resume"):
        open_cache(out)
    with pytest.raises(PixelrecError, match="is incomplete"):
        open_cache(partial_path(out))
    # a partial renamed by hand still says it is incomplete
    partial_path(out).rename(out)
    with pytest.raises(PixelrecError, match="is incomplete"):
        open_cache(out)
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    with pytest.raises(PixelrecError, match=f"{junk}: not a readable HDF5 file"):
        open_cache(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["embeddings"] = np.zeros((2, 2))
    with pytest.raises(PixelrecError, match=f"{foreign}: not a pixelrec embedding cache"):
        open_cache(foreign)
    with pytest.raises(PixelrecError, match="not found"):
        open_cache(tmp_path / "none.h5")


def test_resume_drops_uncommitted_rows(tmp_path):
    out = tmp_path / "c.h5"
    writer, emb, _ = _write(out, batches=(100, 50), tokens=False, finish=False)
    # simulate a kill between a dataset write and the bookkeeping update
    f = writer._f
    f["embeddings"].resize(170, axis=0)
    f["item_ids"].resize(170, axis=0)
    f.flush()
    writer.close()
    resumed = CacheWriter.resume(out)
    assert (resumed.positions_done, resumed.n_rows, resumed.n_failed) == (151, 150, 1)
    assert resumed._f["embeddings"].shape[0] == 150 and resumed._f["item_ids"].shape[0] == 150
    resumed.append(IDS[150:], emb[150:], None, [("bad2", "missing")], positions_done=N + 2)
    resumed.finish()
    with open_cache(out) as cache:
        assert list(cache.item_ids) == IDS
        assert np.array_equal(cache.load_embeddings(), emb.astype(np.float32))


def test_finish_requires_every_position(tmp_path):
    writer, _, _ = _write(tmp_path / "c.h5", batches=(100,), finish=False)
    with pytest.raises(PixelrecError, match="before every item"):
        writer.finish()
    writer.close()


def test_disk_full_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    writer, emb, _ = _write(out, batches=(100,), tokens=False, finish=False)

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(PixelrecError, match=rf"{partial_path(out)}: cannot write the cache: no space left on device"):
        writer.append(IDS[100:200], emb[100:200], None, [], positions_done=201)
    monkeypatch.undo()
    writer.close()
    assert CacheWriter.resume(out).positions_done == 101  # the failed batch was not committed


def test_check_compatible_names_the_attribute(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    cache = open_cache(out)
    cache.check_compatible(model="m", dim=E, split_block=2, pooling="model")
    with pytest.raises(PixelrecError, match=f"{out} was built with model m, this run expects model ViT-B-32"):
        cache.check_compatible(model="ViT-B-32")
    with pytest.raises(PixelrecError, match=f"{out} was built with dim {E}, this run expects dim 512"):
        cache.check_compatible(dim=512)
    with pytest.raises(PixelrecError, match="built with split block 2, this run expects split block 3"):
        cache.check_compatible(split_block=3)
    with pytest.raises(PixelrecError, match="has no top-block weights"):
        cache.top_blocks()


def test_top_blocks_stored_exactly(tmp_path):
    encoder = build_encoder(EncoderConfig(model=TINY_MODEL, seed=5))
    top = encoder.top_blocks(2)
    out = tmp_path / "c.h5"
    writer = CacheWriter.create(out, dict(ATTRS, n_catalogue=0), dim=encoder.dim, embedding_dtype=np.dtype(np.float32),
                                token_shape=(encoder.num_tokens, encoder.width), top_blocks=top)
    writer.finish()
    with open_cache(out) as cache:
        assert cache.embedding_dtype == np.float32 and len(cache) == 0
        rebuilt = cache.top_blocks()
        assert rebuilt.k == 2 and rebuilt.pooling == "model"
        for key, value in top.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), key
