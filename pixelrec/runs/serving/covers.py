"""Item covers for `GET /items/{id}/cover` and the browsing page: read only from the configured stores.

Where a served run's covers are:
- the training catalogue's covers: `serve --images DIR|LMDB` when given, else what the run records
  (config.json's `--images` for an e2e run; for frozen / partial / hybrid runs, the image store the
  embedding cache was encoded from, recorded in the cache); an id run has none unless --images;
- covers of items added after training: RUN_DIR/added/covers/<index id>.<ext>.

A cover is found by the item's id through the store's own listing (a directory scanned once, or
the LMDB's keys), or for an added item by its integer index id, so a request never names a path:
an id the id rule refuses (`data.ids`: `/`, `\\`, a leading dot, NUL, ...) is refused before any
store is asked. Covers are decoded under the pixel cap (`data.images`), scaled to the asked
size and sent as JPEG; recent answers are kept in a small in-memory cache keyed by their ETag.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ...data.ids import id_problem
from ...data.images import IMAGE_EXTENSIONS, ImageLoadError, ImageStore, decode_image_file, open_image_store
from ...errors import PixelrecError
from ..rundir import RunDir
from .engine import ServeError
from .snapshot import Snapshot

MIN_SIZE, MAX_SIZE = 16, 1024  # thumbnail sides a request may ask for
FULL_SIDE = 2048  # a cover asked for without a size is scaled down to at most this side
_KEPT = 256  # encoded covers kept in memory


class NoCover(PixelrecError):
    """An item without a readable cover in the configured stores (the message names it and why)."""


@dataclass(frozen=True)
class Rendered:
    data: bytes
    etag: str
    media_type: str = "image/jpeg"


def recorded_images(run_dir: str) -> tuple[str | None, str]:
    """(the covers a run records, or None; why there are none): e2e's --images, or the image store
    its embedding cache was encoded from (a relative path is taken from the working directory)."""
    run = RunDir(run_dir)
    cfg = run.fit_config(run.read_config())
    if cfg.items.images:
        return str(cfg.items.images), ""
    if not (cfg.items.uses_cache and cfg.items.cache):
        return None, "the run records no covers (an id run)"
    from ...encode.cache import read_cache_attrs

    try:
        images = read_cache_attrs(cfg.items.cache).get("images")
    except PixelrecError as error:
        return None, f"the run's cache, which records where its covers are, cannot be read ({error})"
    if not images:
        return None, f"the run's cache {cfg.items.cache} does not record where its covers are"
    return str(images), ""


class CoverStores:
    """The training catalogue's store (opened on first use) and the run's added covers."""

    def __init__(self, run_dir: str, images: str | None = None):
        """`images` (the --images option) is opened now, and refused in one line when it is no image
        store; what the run records is opened on first use (a problem only shows as missing covers)."""
        self.run = RunDir(run_dir)
        self._source, self._problem = (images, "") if images is not None else recorded_images(run_dir)
        self._store: ImageStore | None = None
        self._opened = False
        self._lock = threading.Lock()
        self._rendered: collections.OrderedDict[str, Rendered] = collections.OrderedDict()
        if images is not None:
            try:
                self._store = open_image_store(images)
            except PixelrecError as error:
                raise PixelrecError(f"--images {images}: {error}") from None
            self._opened = True

    # ---- stores -------------------------------------------------------------------------------
    def catalogue(self) -> ImageStore | None:
        """The training covers' store, or None (see `problem`)."""
        with self._lock:
            if not self._opened:
                self._opened = True
                if self._source is None:
                    self._problem += ": give --images DIR|LMDB"
                else:
                    try:
                        self._store = open_image_store(self._source)
                    except PixelrecError as error:
                        self._problem = f"{error} (give --images DIR|LMDB)"
            return self._store

    @property
    def problem(self) -> str | None:
        """Why there is no catalogue store (None when it opened)."""
        return None if self.catalogue() is not None else self._problem

    def describe(self) -> str:
        store = self.catalogue()
        return store.describe() if store is not None else f"none: {self._problem}"

    def _added_file(self, index_id: int) -> Path | None:
        directory = self.run.added_covers
        for ext in IMAGE_EXTENSIONS:  # what `index --add-images` keeps: <index id>.<lower-case ext>
            path = directory / f"{index_id}.{ext}"
            if path.is_file() and not path.is_symlink():
                return path
        return None

    # ---- covers -------------------------------------------------------------------------------
    def cover(self, snapshot: Snapshot, item_id: str, size: int | None) -> Rendered:
        """The item's cover as JPEG, at most `size` pixels a side (ServeError 404 / 422 when it cannot be)."""
        why = id_problem(item_id)
        if why is not None:
            raise ServeError(422, f"item id {item_id!r} {why}")
        if size is not None and not MIN_SIZE <= size <= MAX_SIZE:
            raise ServeError(422, f"size {size}: expected {MIN_SIZE} to {MAX_SIZE} pixels")
        index_id = snapshot.items.get(item_id)
        if index_id is None:
            raise ServeError(404, f"unknown item {item_id!r}: not in the run's vocabulary or index")
        try:
            return self.jpeg(item_id, index_id, snapshot.is_added(index_id), size)
        except NoCover as error:
            raise ServeError(404, str(error)) from None

    def jpeg(self, item_id: str, index_id: int, added: bool, size: int | None) -> Rendered:
        """The cover of a known item (`added`: added after training, kept under its index id) as JPEG
        of at most `size` pixels a side; NoCover when it has none or it cannot be read."""
        path, store = self._locate(item_id, index_id, added)
        etag = self._etag(item_id, index_id, size, path, store)
        with self._lock:
            if etag in self._rendered:
                self._rendered.move_to_end(etag)
                return self._rendered[etag]
        try:
            image = decode_image_file(path, item_id, size) if path is not None else store.load(item_id, size)
        except ImageLoadError as error:
            raise NoCover(f"item {item_id!r}: its cover cannot be read ({error.reason})") from None
        rendered = Rendered(_jpeg(image, size or FULL_SIDE), etag)
        with self._lock:
            self._rendered[etag] = rendered
            while len(self._rendered) > _KEPT:
                self._rendered.popitem(last=False)
        return rendered

    def _locate(self, item_id: str, index_id: int, added: bool) -> tuple[Path | None, ImageStore | None]:
        """(the added cover's file, None) or (None, the catalogue store holding the item)."""
        if added:
            path = self._added_file(index_id)
            if path is None:
                raise NoCover(f"item {item_id!r} has no cover: not in the run's added covers ({self.run.added_covers})")
            return path, None
        store = self.catalogue()
        if store is None:
            raise NoCover(f"item {item_id!r} has no cover: {self._problem}")
        if item_id not in store:
            raise NoCover(f"item {item_id!r} has no cover: not in {store.describe()}")
        return None, store

    def _etag(self, item_id: str, index_id: int, size: int | None, path: Path | None,
              store: ImageStore | None) -> str:
        """Changes when the file behind the cover changes (modification time and size)."""
        if path is None and hasattr(store, "path_of"):
            path = store.path_of(item_id)  # type: ignore[union-attr]
        source = path if path is not None else Path(store.source)  # type: ignore[union-attr]
        if source.is_dir():
            source = source / "data.mdb"
        try:
            st = os.stat(source)
            stamp = f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            stamp = "-"
        key = f"{source}|{stamp}|{item_id}|{index_id}|{size}"
        return '"' + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] + '"'


def _jpeg(image, side: int) -> bytes:
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()
