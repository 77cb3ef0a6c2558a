"""The HDF5 embedding cache: writer bookkeeping, partial files, chunked reads, compatibility checks."""

from __future__ import annotations

import errno
import pickle

import h5py
import numpy as np
import pytest
import torch

from pixelrec.encode import cache as cache_module
from pixelrec.encode.cache import (FORMAT_VERSION, CacheWriter, block_checksum, open_cache, partial_path,
                                   read_cache_attrs, verify_cache)
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


@pytest.mark.smoke
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
    with pytest.raises(PixelrecError, match=rf"^{partial_path(out)}: cannot write the cache: no space left on device; "
                                            r"free space and rerun the same command to resume$"):
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


# ---- integrity: block checksums, verification, old caches ----------------------------------------


def _corrupt(path, name: str, row: int) -> None:
    """Change one stored value behind the writer's back (a write that never reached the disk)."""
    with h5py.File(path, "r+") as f:
        value = f[name][row]
        f[name][row] = value + 1 if name != "item_ids" else b"xxx"


def test_every_block_is_recorded_with_a_checksum(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 2 and f.attrs["checksum"] == "crc32"
        assert f.attrs["n_blocks"] == 4
        blocks = f["blocks"][()]
        assert blocks["rows"].tolist() == [100, 100, 100, 0] and blocks["failed"].tolist() == [1, 0, 0, 1]
        assert blocks["end_position"].tolist() == [101, 201, 301, N + 2]
        emb, tok = _data()
        assert blocks["crc32"][1] == block_checksum(IDS[100:200], emb[100:200], tok[100:200], [], [])
    report = verify_cache(out)
    assert report.ok and report.checksums and report.complete and report.blocks_verified == 4
    assert (report.n_rows, report.n_failed, report.n_blocks) == (N, 2, 4)
    assert report.summary() == f"{out}: OK, {N} rows, 2 failed items in 4 blocks, every checksum matches"


@pytest.mark.parametrize("name, row", [("embeddings", 150), ("tokens", 199), ("item_ids", 100)])
def test_verify_cache_names_the_first_bad_rows(tmp_path, name, row):
    out = tmp_path / "c.h5"
    _write(out)
    _corrupt(out, name, row)
    with open_cache(out):  # the cheap check reads the last block only
        pass
    report = verify_cache(out)
    assert not report.ok and report.bad_blocks == [1] and report.first_bad_block == 1
    assert report.first_bad_rows == (100, 200) and report.blocks_verified == 3
    assert report.problems[0] == "block 1 (rows 100-199) does not match its checksum"
    assert report.first_bad_items[1:] == ["i0101", "i0102"]
    assert report.summary().startswith(f"{out} is damaged: block 1 (rows 100-199) does not match its checksum, items ")
    assert report.summary().endswith("rebuild it with the same pixelrec encode command and --overwrite")


def test_encode_verify_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from pixelrec.cli import cli

    out = tmp_path / "c.h5"
    _write(out)
    ok = CliRunner().invoke(cli, ["encode", "--verify", str(out)])
    assert ok.exit_code == 0 and "every checksum matches" in ok.output
    _corrupt(out, "tokens", 250)
    bad = CliRunner().invoke(cli, ["encode", "--verify", str(out)])
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is damaged: block 2 (rows 200-299)")


def test_open_cache_refuses_a_damaged_last_block_or_bad_counts(tmp_path):
    out = tmp_path / "c.h5"
    _write(out)
    _corrupt(out, "embeddings", N - 1)
    with pytest.raises(PixelrecError, match=rf"{out} is damaged: block 2 \(rows 200-299\) does not match its "
                                            r"checksum; rebuild it with the same pixelrec encode command and "
                                            r"--overwrite"):
        open_cache(out)
    _write(out)
    with h5py.File(out, "r+") as f:
        f["embeddings"].resize(N - 10, axis=0)
    with pytest.raises(PixelrecError, match=f"{out} is damaged: embeddings holds {N - 10} entries, the header counts "
                                            f"{N} rows; rebuild it"):
        open_cache(out)
    _write(out)
    with h5py.File(out, "r+") as f:
        f.attrs["n_blocks"] = 3
    with pytest.raises(PixelrecError, match="is damaged: the blocks add up to 300 rows and 1 failed items, "
                                            "the header counts 300 and 2"):
        open_cache(out)
    assert not verify_cache(out).ok


def test_finish_never_publishes_a_silently_failed_write(tmp_path):
    out = tmp_path / "c.h5"
    writer, emb, tok = _write(out, finish=False)
    writer._f["tokens"][120] = 0  # the disk lost this write and nobody noticed
    writer.append([], np.empty((0, E), np.float16), None, [("bad2", "missing")], positions_done=N + 2)
    with pytest.raises(PixelrecError, match=rf"{partial_path(out)}: block 1 \(rows 100-199\) does not match its "
                                            r"checksum after writing, so the cache was not published; rerun the same"):
        writer.finish()
    assert not out.exists() and partial_path(out).exists()
    resumed = CacheWriter.resume(out)  # keeps block 0 only
    assert (resumed.positions_done, resumed.n_rows, resumed.n_failed, resumed.n_blocks) == (101, 100, 1, 1)
    resumed.append(IDS[100:], emb[100:], tok[100:], [("bad2", "missing")], positions_done=N + 2)
    resumed.finish()
    with open_cache(out) as cache:
        assert np.array_equal(cache.read_tokens(np.arange(N)), tok)


def test_resume_drops_a_damaged_block_and_everything_after_it(tmp_path):
    out = tmp_path / "c.h5"
    writer, emb, tok = _write(out, batches=(100, 100, 100), finish=False)
    writer.close()
    _corrupt(partial_path(out), "embeddings", 150)
    resumed = CacheWriter.resume(out)
    assert (resumed.positions_done, resumed.n_rows, resumed.n_blocks) == (101, 100, 1)
    assert resumed._f["embeddings"].shape[0] == 100 and resumed._f["blocks"].shape[0] == 1
    resumed.close()
    report = verify_cache(partial_path(out))
    assert report.ok and not report.complete and report.n_blocks == 1
    assert "(unfinished): OK" in report.summary()


def test_format_1_caches_still_open(tmp_path):
    """A cache written before block checksums: counts are checked, content cannot be."""
    emb, _ = _data()
    out = tmp_path / "old.h5"
    with h5py.File(out, "w") as f:
        f.attrs.update(ATTRS, n_catalogue=N + 1, format_version=1, positions_done=N + 1, n_rows=N, n_failed=1,
                       complete=True)
        f.create_dataset("item_ids", data=np.array(IDS, dtype=object), dtype=h5py.string_dtype(), maxshape=(None,))
        f.create_dataset("embeddings", data=emb, maxshape=(None, E))
        f.create_dataset("failed_item_ids", data=np.array(["bad"], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("failed_reasons", data=np.array(["missing"], dtype=object), dtype=h5py.string_dtype())
    with open_cache(out) as cache:
        assert list(cache.item_ids) == IDS and cache.failed == {"bad": "missing"}
    report = verify_cache(out)
    assert report.ok and not report.checksums and report.format_version == 1 and report.n_blocks == 0
    assert "no checksums were recorded" in report.summary()
    with h5py.File(out, "r+") as f:
        f["embeddings"].resize(N - 1, axis=0)
    with pytest.raises(PixelrecError, match=f"{out} is damaged: embeddings holds {N - 1} entries"):
        open_cache(out)
    assert not verify_cache(out).ok


def test_verify_cache_refuses_what_is_not_a_cache(tmp_path):
    with pytest.raises(PixelrecError, match="not found"):
        verify_cache(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    with pytest.raises(PixelrecError, match=f"{junk}: not a readable HDF5 file"):
        verify_cache(junk)


@pytest.mark.parametrize("error, words, resumable", [
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system; choose a writable location", False),
    (OSError(errno.EACCES, "Permission denied"), "permission denied", False),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded; free space and rerun the same command "
                                                  "to resume", True),
    (RuntimeError("Can't synchronously write data (file write failed: time = now\n, filename = 'x', "
                  "errno = 28, error message = 'No space left on device')"),
     "no space left on device; free space and rerun the same command to resume", True),
])
def test_write_errors_are_worded_by_errno(tmp_path, monkeypatch, error, words, resumable):
    out = tmp_path / "c.h5"
    writer, emb, _ = _write(out, batches=(100,), tokens=False, finish=False)

    def failing(self, key, value):
        raise error

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    with pytest.raises(PixelrecError) as failure:
        writer.append(IDS[100:200], emb[100:200], None, [], positions_done=201)
    assert str(failure.value) == f"{partial_path(out)}: cannot write the cache: {words}"
    assert ("resume" in str(failure.value)) == resumable
    monkeypatch.undo()
    with pytest.raises(PixelrecError, match="writer is closed"):  # a failed writer is closed for good
        writer.append(IDS[100:200], emb[100:200], None, [], positions_done=201)
    assert CacheWriter.resume(out).positions_done == 101


def test_a_writer_hdf5_cannot_close_is_never_reopened_in_this_process(tmp_path, monkeypatch):
    """After a failed flush HDF5 may fail to close the file and keep it open in a broken state; this
    process must then neither touch it nor reopen it (it would get that state back)."""
    out = tmp_path / "c.h5"
    writer, emb, _ = _write(out, batches=(100,), tokens=False, finish=False)
    held = writer._f

    def full(self, key, value):
        raise RuntimeError("Unable to synchronously flush file (file write failed: errno = 28, "
                           "error message = 'No space left on device')")

    def cannot_close(self):
        raise RuntimeError("Can't destroy cache (slist already enabled?)")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    monkeypatch.setattr(h5py.File, "close", cannot_close)
    with pytest.raises(PixelrecError, match="no space left on device; free space and rerun"):
        writer.append(IDS[100:200], emb[100:200], None, [], positions_done=201)
    monkeypatch.undo()
    try:
        with pytest.raises(PixelrecError, match=f"{partial_path(out)}: a write to this file failed earlier in this "
                                                "process and HDF5 still holds it; rerun in a new process"):
            CacheWriter.resume(out)
        with pytest.raises(PixelrecError, match="rerun in a new process"):
            read_cache_attrs(partial_path(out))
        fresh = CacheWriter.create(out, dict(ATTRS, n_catalogue=0), dim=E, embedding_dtype=np.dtype(np.float16))
        fresh.finish()  # --overwrite starts a new file beside the held one
        assert open_cache(out).attrs["n_rows"] == 0
    finally:
        cache_module._ABANDONED.clear()
        held.close()


def test_resume_rebuilds_a_file_hdf5_cannot_cut_back(tmp_path, monkeypatch):
    """A failed write can leave chunk addresses past the file's end: shrinking such a dataset fails,
    so the good blocks are copied into a fresh file instead."""
    out = tmp_path / "c.h5"
    writer, emb, tok = _write(out, batches=(100, 100), finish=False)
    f = writer._f
    f["embeddings"].resize(250, axis=0)  # rows of a block that never committed
    f["tokens"].resize(250, axis=0)
    writer.close()
    real_resize = h5py.Dataset.resize

    def broken_shrink(self, size, axis=None):
        if size < self.shape[0]:
            raise RuntimeError("Unable to synchronously change a dataset's dimensions (addr overflow, addr = 9)")
        real_resize(self, size, axis)

    monkeypatch.setattr(h5py.Dataset, "resize", broken_shrink)
    resumed = CacheWriter.resume(out)
    monkeypatch.undo()
    assert (resumed.positions_done, resumed.n_rows, resumed.n_blocks) == (201, 200, 2)
    assert resumed._f["embeddings"].shape[0] == 200 and resumed.attrs["model"] == "m"
    resumed.append(IDS[200:], emb[200:], tok[200:], [("bad2", "missing")], positions_done=N + 2)
    resumed.finish()
    assert not partial_path(out).with_name(partial_path(out).name + ".rebuild").exists()
    with open_cache(out) as cache:
        assert list(cache.item_ids) == IDS and cache.failed == {"bad1": "zero-byte file", "bad2": "missing"}
        assert np.array_equal(cache.read_tokens(np.arange(N)), tok)
    assert verify_cache(out).ok
