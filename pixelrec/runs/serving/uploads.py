"""Uploaded covers: item ids checked, every file decoded before anything is added, and the covers
laid out as a directory of `<item_id>.<ext>` that `add_images_to_run` reads (`index --add-images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...data.images import ImageLoadError, decode_image_file
from ..rundir import UNUSED_NAME
from .engine import ServeError

RESERVED_IDS = ("[PAD]", UNUSED_NAME)
MAX_ID_BYTES = 200  # an id is a file name in RUN_DIR/added/covers
_KEPT_FORMATS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}  # stored as uploaded


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
    """An id that can name a cover file and a line of added_items.txt, or a 422 naming the file."""
    item_id = cover.item_id
    why = None
    if not item_id or item_id != item_id.strip():
        why = "is empty or starts or ends with white space"
    elif any(c in item_id for c in "/\\\0") or any(not c.isprintable() for c in item_id):
        why = "holds a slash, a backslash or a control character"
    elif item_id.startswith("."):
        why = "starts with a dot"
    elif item_id in RESERVED_IDS:
        why = "is reserved"
    elif len(item_id.encode("utf-8")) > MAX_ID_BYTES:
        why = f"is longer than {MAX_ID_BYTES} bytes"
    if why:
        raise ServeError(422, f"cover {cover.filename!r}: item id {item_id!r} {why}")


def write_covers(covers: list[Cover], directory: Path) -> None:
    """Decode every cover (422 naming the first file that is not an image) and write `<id>.<ext>` files.

    JPEG and PNG files are kept as uploaded; any other image format Pillow reads is stored as PNG.
    """
    raw = directory / ".raw"
    raw.mkdir()
    for n, cover in enumerate(covers):
        path = raw / str(n)
        path.write_bytes(cover.data)
        try:
            image = decode_image_file(path, cover.item_id)
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
