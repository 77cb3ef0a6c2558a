"""`encode` on real full and read-only file systems: small tmpfs mounts made by the test.

Needs root and a kernel that lets it mount tmpfs (skipped otherwise). Every mount is unmounted in
a finally, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest

from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images, open_cache, partial_path
from pixelrec.encode.cache import verify_cache
from pixelrec.encode.encoder import TINY_MODEL
from pixelrec.errors import PixelrecError
from pixelrec.runtime import lock_path_for
from test_encode import make_covers

SETTINGS = dict(encoder=EncoderConfig(model=TINY_MODEL), split_block=2, batch_size=16, num_workers=0)
PAGE = 4096


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` with mount `options`; skips the test where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def room_for(reference: Path, fraction: float) -> int:
    """A tmpfs size (bytes, whole pages) that holds the cache's header and weights and about
    `fraction` of its rows, so the disk fills in the middle of the batches."""
    with h5py.File(reference, "r") as f:
        rows = f["embeddings"].nbytes + f["tokens"].nbytes
    return int(reference.stat().st_size - (1 - fraction) * rows) // PAGE * PAGE


def _content(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("item_ids", "embeddings", "tokens", "blocks", "failed_item_ids")}


def _assert_same_cache(got: Path, reference: Path) -> None:
    a, b = _content(got), _content(reference)
    for name in b:
        assert np.array_equal(a[name], b[name]), name
    assert verify_cache(got).ok


@pytest.fixture(scope="module")
def covers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("covers")
    make_covers(root, 120)
    return root


@pytest.fixture(scope="module")
def reference(covers, tmp_path_factory) -> Path:
    """An uninterrupted encode of the same covers with the same settings."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    encode_images(EncodeConfig(images=str(covers), out=str(out), **SETTINGS))
    return out


def test_disk_full_then_resume_after_growing_the_disk(tmp_path, covers, reference):
    with tmpfs(tmp_path / "disk", f"size={room_for(reference, 0.5)}") as disk:
        out = disk / "c.h5"
        cfg = EncodeConfig(images=str(covers), out=str(out), **SETTINGS)
        with pytest.raises(PixelrecError) as failure:
            encode_images(cfg)
        message = str(failure.value)
        assert "\n" not in message and "no space left on device" in message, message
        assert message.startswith(f"{partial_path(out)}: cannot write the cache")
        assert "rerun the same command to resume" in message
        assert not out.exists() and partial_path(out).exists() and not lock_path_for(out).exists()

        remount(disk, "size=4m")
        summary = encode_images(cfg)  # in the same process, as a notebook user would retry
        assert 0 < summary.resumed_from < 120 and summary.n_encoded == 120
        assert not partial_path(out).exists()
        _assert_same_cache(out, reference)
        with open_cache(out) as cache:
            assert len(cache) == 120 and cache.has_tokens


def test_cli_disk_full_is_one_line_and_exit_2_then_resumes(tmp_path, covers, reference):
    """The reported reproduction: once a silent success with zero rows and a segfault."""
    env = dict(os.environ, PIXELREC_QUIET="1")
    with tmpfs(tmp_path / "disk", f"size={room_for(reference, 0.3)}") as disk:
        out = disk / "c.h5"
        command = [sys.executable, "-m", "pixelrec", "encode", "--images", str(covers), "--out", str(out),
                   "--encoder", TINY_MODEL, "--split-block", "2", "--batch-size", "16", "--workers", "0"]
        full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert full.returncode == 2, full.stderr[-2000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left on device" in lines[0], lines[:5]
        assert full.stdout == "" and not out.exists()

        remount(disk, "size=4m")
        rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "120 items encoded" in rerun.stdout and "resumed after" in rerun.stdout
        _assert_same_cache(out, reference)


def test_read_only_file_system_says_so(tmp_path, covers):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        with pytest.raises(PixelrecError) as failure:
            encode_images(EncodeConfig(images=str(covers), out=str(disk / "c.h5"), **SETTINGS))
        message = str(failure.value)
        assert "read-only file system" in message and "\n" not in message, message
        assert "resume" not in message and "free space" not in message
        assert str(disk / "c.h5") in message
