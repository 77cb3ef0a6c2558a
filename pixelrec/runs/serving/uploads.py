"""Uploaded covers: item ids checked, every file decoded before anything is added, and the covers
laid out as a directory of `<item_id>.<ext>` that `add_images_to_run` reads (`index --add-images`).

That directory is a temporary one named after the server's process id (`upload_dir`), removed when
the addition ends; those a killed server left behind are removed when the next server starts
(`remove_stale_upload_dirs`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...data.ids import id_problem
from ...data.images import ImageLoadError, decode_image_file
from .engine import ServeError

_KEPT_FORMATS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}  # stored as uploaded
_CHECK_SIDE = 512  # uploads are decoded to check them: JPEG at reduced size, no smaller than this
UPLOAD_PREFIX = "pixelrec-serve-upload-"
_UPLOAD_DIR = re.compile(re.escape(UPLOAD_PREFIX) + r"(\d+)-")


@dataclass(frozen=True)
class Cover:
    """One uploaded cover: the item id it is for, the name the client gave the file, its bytes."""

    item_id: str
    filename: str
    data: bytes


def pair_covers(files: list[tuple[str, bytes]], ids: list[str] | None) -> list[Cover]:
    """Covers from (file name, bytes) uploads; ids given in order, or each file's name without its extension."""
    if ids is not None and len(ids) != len(files):
        raise ServeError(422, f"{len(ids)} ids for {len(files)} covers: give one id per cover, in the same order, "
                              f"or none (each cover's file name is then its item id)")
    covers = [Cover(ids[i] if ids is not None else _stem(name), name, data) for i, (name, data) in enumerate(files)]
    seen: set[str] = set()
    for cover in covers:
        check_item_id(cover)
        if cover.item_id in seen:
            raise ServeError(422, f"item id {cover.item_id!r} is given to more than one cover")
        seen.add(cover.item_id)
    return covers


def check_item_id(cover: Cover) -> None:
    """An id that passes the id rule (`data.ids`), or a 422 naming the file."""
    why = id_problem(cover.item_id)
    if why:
        raise ServeError(422, f"cover {cover.filename!r}: item id {cover.item_id!r} {why}")


def write_covers(covers: list[Cover], directory: Path) -> None:
    """Decode every cover (422 naming the first file that is not an image) and write `<id>.<ext>` files.

    JPEG and PNG files are kept as uploaded; any other image format Pillow reads is stored as PNG.
    Decoding is bounded (`data.images`): an image above the pixel cap is refused from its header.
    """
    raw = directory / ".raw"
    raw.mkdir()
    for n, cover in enumerate(covers):
        path = raw / str(n)
        path.write_bytes(cover.data)
        try:
            image = decode_image_file(path, cover.item_id, max_side=_CHECK_SIDE)
        except ImageLoadError as error:
            raise ServeError(422, f"cover {cover.filename!r} (item {cover.item_id!r}): {error.reason}") from None
        ext = next((e for magic, e in _KEPT_FORMATS.items() if cover.data.startswith(magic)), None)
        if ext is None:
            image.save(directory / f"{cover.item_id}.png", format="PNG")
        else:
            path.rename(directory / f"{cover.item_id}.{ext}")


def _stem(filename: str) -> str:
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


@contextlib.contextmanager
def upload_dir() -> Iterator[Path]:
    """A fresh temporary directory for one upload, named after this process and removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_upload_dirs(parent: str | None = None) -> list[Path]:
    """Remove the upload directories of server processes that no longer run (killed mid-upload):
    only this user's, only those whose process id is gone. Returns what was removed."""
    parent_dir = Path(parent or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent_dir) as entries:
        for entry in entries:
            match = _UPLOAD_DIR.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.getuid() and not _alive(int(match.group(1))):
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid: leave its directory alone
    return True
