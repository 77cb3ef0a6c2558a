"""Two encodes of the same cache: the second fails at once, the first finishes correctly.

HDF5's own file locking is switched off (HDF5_USE_FILE_LOCKING=FALSE, as on many network file
systems), so only pixelrec's lock file (`runtime.lock_path_for(out)`) keeps the writers apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images, open_cache, partial_path
from pixelrec.encode.cache import verify_cache
from pixelrec.encode.encoder import TINY_MODEL
from pixelrec.errors import PixelrecError
from pixelrec.runtime import FileLock, lock_path_for
from test_encode import make_covers

TINY = EncoderConfig(model=TINY_MODEL)

# The first writer: commits 2 batches, says PAUSED, waits for a line on stdin, then finishes.
_FIRST = textwrap.dedent(
    """
    import sys
    from pixelrec.encode import cache, EncodeConfig, EncoderConfig, encode_images

    append, calls = cache.CacheWriter.append, []
    def pausing_append(self, *args, **kwargs):
        append(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            print("PAUSED", flush=True)
            sys.stdin.readline()
    cache.CacheWriter.append = pausing_append
    summary = encode_images(EncodeConfig(images=sys.argv[1], out=sys.argv[2], batch_size=8, num_workers=0,
                                         encoder=EncoderConfig(model="pixelrec-tiny-vit")))
    print("DONE", summary.n_encoded, flush=True)
    """
)


def test_lock_held_in_process_refuses_encode_and_overwrite(tmp_path):
    """flock conflicts between two open file descriptions, even in one process."""
    images = tmp_path / "covers"
    make_covers(images, 10)
    out = tmp_path / "c.h5"
    encode_images(EncodeConfig(images=str(images), out=str(out), encoder=TINY, num_workers=0))
    stamp = out.stat().st_mtime_ns
    with FileLock(lock_path_for(out), f"the cache {out}"):
        for overwrite in (False, True):
            with pytest.raises(PixelrecError, match=rf"the cache {out} is in use by another pixelrec process "
                                                    rf"\(pid {os.getpid()}, since "):
                encode_images(EncodeConfig(images=str(images), out=str(out), encoder=TINY, num_workers=0,
                                           overwrite=overwrite, float32=True))
    assert out.stat().st_mtime_ns == stamp and not partial_path(out).exists()
    summary = encode_images(EncodeConfig(images=str(images), out=str(out), encoder=TINY, num_workers=0,
                                         overwrite=True, float32=True))  # free again
    assert summary.n_encoded == 10 and not lock_path_for(out).exists()


@pytest.mark.slow
def test_second_encode_fails_at_once_without_hdf5_locking(tmp_path):
    images = tmp_path / "covers"
    make_covers(images, 40)
    out = tmp_path / "c.h5"
    env = dict(os.environ, PIXELREC_QUIET="1", HDF5_USE_FILE_LOCKING="FALSE")
    first = subprocess.Popen([sys.executable, "-c", _FIRST, str(images), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(240, first.kill)  # never hang on readline if the child misbehaves
    watchdog.start()
    try:
        reference = tmp_path / "ref.h5"
        encode_images(EncodeConfig(images=str(images), out=str(reference), batch_size=8, num_workers=0, encoder=TINY))
        assert first.stdout.readline().strip() == "PAUSED"
        command = [sys.executable, "-m", "pixelrec", "encode", "--images", str(images), "--out", str(out),
                   "--encoder", TINY_MODEL, "--batch-size", "8", "--workers", "0"]
        for extra in ([], ["--overwrite"]):
            second = subprocess.run(command + extra, capture_output=True, text=True, env=env, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, lines[:5]
            assert lines[0].startswith(f"error: the cache {out} is in use by another pixelrec process "
                                       f"(pid {first.pid}, since "), lines[0]
        with h5py.File(partial_path(out), "r") as f:  # untouched by the refused --overwrite
            assert f.attrs["n_blocks"] == 2 and f.attrs["positions_done"] == 16
        first.stdin.write("go on\n")
        first.stdin.flush()
        assert first.stdout.readline().split() == ["DONE", "40"]
        assert first.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        first.kill()
        first.wait()

    assert verify_cache(out).ok and not lock_path_for(out).exists()
    with open_cache(out) as got, open_cache(reference) as ref:
        assert list(got.item_ids) == list(ref.item_ids) == sorted(p.stem for p in Path(images).iterdir())
        assert np.array_equal(got.load_embeddings(), ref.load_embeddings())


def _children_holding(path: Path) -> list[str]:
    """Child processes of this one with a descriptor open on `path` (Linux /proc)."""
    me, holders = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] != me:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                holders.append(pid)
        except OSError:
            continue
    return holders


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_decoding_workers_do_not_inherit_the_lock(tmp_path, monkeypatch):
    """A worker outliving a killed encode must not keep the cache locked."""
    from pixelrec.encode import cache

    images = tmp_path / "covers"
    make_covers(images, 24)
    out = tmp_path / "c.h5"
    seen: list[list[str]] = []
    append = cache.CacheWriter.append

    def looking_append(self, *args, **kwargs):
        seen.append(_children_holding(lock_path_for(out)))
        append(self, *args, **kwargs)

    monkeypatch.setattr(cache.CacheWriter, "append", looking_append)
    encode_images(EncodeConfig(images=str(images), out=str(out), batch_size=8, num_workers=2, encoder=TINY))
    assert len(seen) == 3 and seen == [[], [], []]
