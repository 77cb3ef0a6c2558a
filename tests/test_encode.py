"""encode_images end to end on tiny images: content, failures, resume after a kill, refusals, LMDB input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pixelrec.data.images import open_image_store
from pixelrec.data.lmdb_writer import write_pixelrec_lmdb
from pixelrec.encode import EncodeConfig, EncoderConfig, build_encoder, encode_images, open_cache, partial_path
from pixelrec.encode.cache import CacheWriter
from pixelrec.encode.encoder import TINY_MODEL
from pixelrec.errors import PixelrecError
from pixelrec.runtime import set_quiet

TINY = EncoderConfig(model=TINY_MODEL)


def _arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + n_ % 7, 40, 3), dtype=np.uint8) for n_ in range(n)]


def make_covers(root: Path, n: int, seed: int = 0, ext: str = "jpg") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"item{i:04d}" for i in range(n)]
    for item_id, arr in zip(ids, _arrays(n, seed)):
        Image.fromarray(arr).save(root / f"{item_id}.{ext}")
    return ids


def add_bad_covers(root: Path) -> dict[str, str]:
    """Three broken covers: id -> expected start of the recorded reason."""
    (root / "bad_empty.jpg").write_bytes(b"")
    (root / "bad_garbage.jpg").write_bytes(b"this is not an image" * 10)
    good = root / "item0000.jpg"
    (root / "bad_truncated.jpg").write_bytes(good.read_bytes()[:200])
    return {"bad_empty": "zero-byte file", "bad_garbage": "not a recognised image format",
            "bad_truncated": "corrupt or truncated image"}


def encode(tmp_path: Path, images: Path, name: str = "c.h5", **kwargs) -> tuple[Path, object]:
    kwargs.setdefault("encoder", TINY)
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("num_workers", 0)
    out = tmp_path / name
    return out, encode_images(EncodeConfig(images=str(images), out=str(out), **kwargs))


def direct_embeddings(images: Path, ids: list[str], cfg: EncoderConfig = TINY) -> np.ndarray:
    encoder = build_encoder(cfg)
    loader = encoder.pixel_loader(open_image_store(images))
    with torch.no_grad():
        return encoder(torch.stack([loader(i) for i in ids])).numpy()


@pytest.mark.smoke
def test_encode_directory(tmp_path):
    images = tmp_path / "covers"
    ids = make_covers(images, 40)
    bad = add_bad_covers(images)
    out, summary = encode(tmp_path, images, split_block=2)

    assert (summary.n_items, summary.n_encoded, summary.n_failed, summary.resumed_from) == (43, 40, 3, 0)
    assert not summary.already_complete and summary.images_per_s > 0
    assert set(summary.failed) == set(bad)
    for item_id, reason in bad.items():
        assert summary.failed[item_id].startswith(reason), summary.failed[item_id]

    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape == (40, 32)
        assert f["tokens"].dtype == np.float16 and f["tokens"].shape == (40, 17, 64)
        assert f.attrs["split_block"] == 2
    with open_cache(out) as cache:
        assert list(cache.item_ids) == ids
        assert cache.failed == summary.failed
        attrs = cache.attrs
        for key, value in dict(model=TINY_MODEL, pretrained="none", image_size=32, dim=32, normalized=False,
                               pooling="model", preset="default", embedding_dtype="float16").items():
            assert attrs[key] == value, key
        assert '"layers": 4' in attrs["model_config"] and '"resize_mode": "shortest"' in attrs["preprocess"]
        assert attrs["created"] and attrs["pixelrec_version"]

        embeddings = cache.load_embeddings()
        expected = direct_embeddings(images, ids)
        np.testing.assert_allclose(embeddings, expected, rtol=2e-3, atol=2e-3)  # float16 rounding
        assert not np.allclose(embeddings[:-1], expected[1:], atol=0.05)  # rows belong to their ids

        rows = cache.rows_for(["item0031", "item0002", "item0031"])
        tokens = torch.from_numpy(cache.read_tokens(rows)).float()
        with torch.no_grad():
            rebuilt = cache.top_blocks()(tokens).numpy()
        np.testing.assert_allclose(rebuilt, cache.read_embeddings(rows), rtol=0, atol=1e-2)


def test_workers_give_the_same_cache_and_flags_apply(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 20)
    a, _ = encode(tmp_path, images, "a.h5", num_workers=0)
    b, _ = encode(tmp_path, images, "b.h5", num_workers=2, batch_size=8)
    with open_cache(a) as ca, open_cache(b) as cb:
        assert np.array_equal(ca.load_embeddings(), cb.load_embeddings())
    c, _ = encode(tmp_path, images, "c.h5", float32=True, normalize=True)
    with open_cache(c) as cc:
        assert cc.embedding_dtype == np.float32 and cc.attrs["normalized"] is True
        np.testing.assert_allclose(np.linalg.norm(cc.load_embeddings(), axis=1), 1.0, rtol=1e-5)


def _write_csv(path: Path, item_ids: list[str]) -> Path:
    rows = [f"{item_id},u{n % 3},{n}" for n, item_id in enumerate(item_ids)]
    path.write_text("item_id,user_id,timestamp\n" + "\n".join(rows) + "\n")
    return path


def test_interactions_select_items_and_missing_images(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 12)
    csv = _write_csv(tmp_path / "inter.csv", ["item0003", "ghost2", "item0001", "ghost1", "item0003"])
    with pytest.raises(PixelrecError, match=rf"2 items in {csv} have no image in {images}, e.g. ghost1, ghost2; "
                                            r"pass --skip-missing"):
        encode(tmp_path, images, interactions=str(csv))
    assert not (tmp_path / "c.h5").exists() and not partial_path(tmp_path / "c.h5").exists()

    out, summary = encode(tmp_path, images, interactions=str(csv), skip_missing=True)
    assert summary.failed == {"ghost1": "missing", "ghost2": "missing"}
    with open_cache(out) as cache:
        assert list(cache.item_ids) == ["item0001", "item0003"]
        assert cache.failed == {"ghost1": "missing", "ghost2": "missing"}

    nobody = _write_csv(tmp_path / "nobody.csv", ["ghost1", "ghost2"])
    with pytest.raises(PixelrecError, match="none of the 2 items"):
        encode(tmp_path, images, "n.h5", interactions=str(nobody), skip_missing=True)


def test_bad_image_stores(tmp_path):
    with pytest.raises(PixelrecError, match="not found"):
        encode(tmp_path, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixelrecError, match="no .jpg"):
        encode(tmp_path, tmp_path / "empty")


def test_split_block_errors(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 3)
    with pytest.raises(PixelrecError, match=r"--split-block 5: expected 1\.\.4 for pixelrec-tiny-rn \(CLIP ResNet"):
        encode(tmp_path, images, encoder=EncoderConfig(model="pixelrec-tiny-rn"), split_block=5)
    with pytest.raises(PixelrecError, match=r"--split-block 9: expected 1\.\.4"):
        encode(tmp_path, images, split_block=9)


def test_existing_cache_is_reused_or_refused(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 10)
    out, _ = encode(tmp_path, images)
    stamp = out.stat().st_mtime_ns

    _, again = encode(tmp_path, images)
    assert again.already_complete and again.n_encoded == 10 and out.stat().st_mtime_ns == stamp

    rn = EncoderConfig(model="pixelrec-tiny-rn")
    with pytest.raises(PixelrecError, match=f"{out} was built with model {TINY_MODEL}, this run asks for model "
                                            "pixelrec-tiny-rn; use --overwrite or another --out"):
        encode(tmp_path, images, encoder=rn)
    with pytest.raises(PixelrecError, match="was built with encoder weights"):
        encode(tmp_path, images, encoder=EncoderConfig(model=TINY_MODEL, seed=1))
    make_covers(images, 11)  # one more image: another item set
    with pytest.raises(PixelrecError, match=r"built for another item set \(10 items\), this run asks for 11 items"):
        encode(tmp_path, images)

    foreign = tmp_path / "notes.h5"
    foreign.write_text("my notes")
    with pytest.raises(PixelrecError, match=f"{foreign}: not a readable HDF5 file .*; use --overwrite or another --out"):
        encode(tmp_path, images, "notes.h5")

    _, replaced = encode(tmp_path, images, encoder=rn, overwrite=True)
    assert replaced.n_encoded == 11
    with open_cache(out) as cache:
        assert cache.attrs["model"] == "pixelrec-tiny-rn"


def test_disk_full_then_resume(tmp_path, monkeypatch):
    images = tmp_path / "covers"
    make_covers(images, 30)
    reference, _ = encode(tmp_path, images, "ref.h5")

    out = tmp_path / "c.h5"
    real_setitem = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def flaky(self, key, value):
        if self.name == "/embeddings":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", flaky)
    with pytest.raises(PixelrecError, match=rf"^{partial_path(out)}: cannot write the cache: no space left on device; "
                                            r"free space and rerun the same command to resume$"):
        encode(tmp_path, images)
    monkeypatch.undo()
    assert not out.exists()
    with pytest.raises(PixelrecError, match="is incomplete"):
        open_cache(out)
    with pytest.raises(PixelrecError, match=f"{partial_path(out)} was built with model"):
        encode(tmp_path, images, encoder=EncoderConfig(model="pixelrec-tiny-rn"))

    _, summary = encode(tmp_path, images)
    assert summary.resumed_from == 16  # two batches of 8 were committed before the disk filled
    with open_cache(out) as got, open_cache(reference) as ref:
        assert np.array_equal(got.load_embeddings(), ref.load_embeddings())
        assert list(got.item_ids) == list(ref.item_ids)


def test_resume_reverifies_committed_blocks(tmp_path, monkeypatch):
    """A committed block damaged on disk after the failure is encoded again, with the ones after it."""
    images = tmp_path / "covers"
    make_covers(images, 40)
    reference, _ = encode(tmp_path, images, "ref.h5")
    out = tmp_path / "c.h5"
    real_append = CacheWriter.append

    def fail_fifth(self, *args, **kwargs):
        if self.n_blocks == 4:
            raise PixelrecError("stop")
        real_append(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "append", fail_fifth)
    with pytest.raises(PixelrecError, match="stop"):
        encode(tmp_path, images)
    monkeypatch.undo()
    with h5py.File(partial_path(out), "r+") as f:
        assert f.attrs["n_blocks"] == 4
        f["embeddings"][12] = 0  # block 1 (rows 8-15)
    _, summary = encode(tmp_path, images)
    assert summary.resumed_from == 8
    with open_cache(out) as got, open_cache(reference) as ref:
        assert np.array_equal(got.load_embeddings(), ref.load_embeddings())


@pytest.mark.parametrize("damage", ["garbage", "format 1"])
def test_partial_that_cannot_be_resumed_starts_again(tmp_path, capsys, damage):
    images = tmp_path / "covers"
    make_covers(images, 12)
    out = tmp_path / "c.h5"
    if damage == "garbage":
        partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # e.g. cut short by a crash
    else:  # a partial left by a pixelrec without block checksums
        encode(tmp_path, images)
        out.rename(partial_path(out))
        with h5py.File(partial_path(out), "r+") as f:
            f.attrs.update(format_version=1, complete=False, positions_done=8, n_rows=8)
            del f["blocks"]
    set_quiet(False)
    try:
        _, summary = encode(tmp_path, images)
    finally:
        set_quiet(True)
    assert summary.resumed_from == 0 and summary.n_encoded == 12
    log = capsys.readouterr().err
    assert f"{partial_path(out)}" in log and "starting again from the first item" in log
    assert open_cache(out).attrs["format_version"] == 2


def test_lmdb_store_gives_the_same_embeddings(tmp_path):
    arrays = _arrays(12, seed=3)
    ids = [f"item{i:04d}" for i in range(12)]
    covers = tmp_path / "covers"
    covers.mkdir()
    for item_id, arr in zip(ids, arrays):
        Image.fromarray(arr).save(covers / f"{item_id}.png")  # lossless, like the LMDB's raw pixels
    lmdb_path = tmp_path / "images.lmdb"
    write_pixelrec_lmdb(lmdb_path, zip(ids, arrays))
    a, _ = encode(tmp_path, covers, "dir.h5")
    b, summary = encode(tmp_path, lmdb_path, "lmdb.h5", num_workers=2)
    assert summary.n_encoded == 12
    with open_cache(a) as ca, open_cache(b) as cb:
        assert list(cb.item_ids) == ids
        assert np.array_equal(ca.load_embeddings(), cb.load_embeddings())


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pixelrec.encode import cache, EncodeConfig, EncoderConfig, encode_images

    append, calls = cache.CacheWriter.append, []
    def pausing_append(self, *args, **kwargs):  # stop for the parent's SIGKILL after 5 committed batches
        append(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            print("PAUSED", flush=True)
            time.sleep(600)
    cache.CacheWriter.append = pausing_append
    encode_images(EncodeConfig(images=sys.argv[1], out=sys.argv[2], encoder=EncoderConfig(model="pixelrec-tiny-vit"),
                               batch_size=8, num_workers=2, split_block=2))
    """
)


def _datasets(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items() if k != "created"}
    return found, attrs


@pytest.mark.slow
def test_killed_encode_resumes_to_the_same_cache(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 200)
    add_bad_covers(images)  # failures both before and after the kill point (ids sort around "item")
    out = tmp_path / "c.h5"
    settings = dict(batch_size=8, num_workers=2, split_block=2)

    killed = subprocess.Popen([sys.executable, "-c", _CHILD, str(images), str(out)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PIXELREC_QUIET="1"), start_new_session=True)
    watchdog = threading.Timer(180, killed.kill)  # never hang on readline if the child misbehaves
    watchdog.start()
    try:
        reference, _ = encode(tmp_path, images, "ref.h5", **settings)  # meanwhile, an uninterrupted run
        assert killed.stdout.readline().strip() == "PAUSED"
    finally:
        watchdog.cancel()
        os.killpg(killed.pid, signal.SIGKILL)  # the whole group: the process and its DataLoader workers
        killed.wait()

    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as f:
        assert f.attrs["positions_done"] == 40 and not f.attrs["complete"]
    with pytest.raises(PixelrecError, match="is incomplete: rerun the same encode command to resume"):
        open_cache(out)

    _, summary = encode(tmp_path, images, **settings)
    assert summary.resumed_from == 40 and summary.n_encoded == 200 and summary.n_failed == 3

    got, got_attrs = _datasets(out)
    ref, ref_attrs = _datasets(reference)
    assert got_attrs == ref_attrs
    assert got.keys() == ref.keys() and {"tokens", "failed_reasons", "top_blocks/head.proj"} <= got.keys()
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
