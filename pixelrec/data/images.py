"""Item cover image stores: a directory of `<item_id>.<ext>` files or a PixelRec LMDB.

Every store returns fully decoded RGB `PIL.Image`s and raises `ImageLoadError` (a `PixelrecError`)
with a short reason for an item it cannot load, so callers can collect failures per item.
Stores are picklable and safe in DataLoader worker processes: LMDB environments live in a
per-process cache outside the store objects, opened lazily and reopened after a fork.

PixelRec's LMDB values are pickles of a class `LMDB_Image` defined in its script's `__main__`.
They are read with a restricted unpickler that maps any class named `LMDB_Image` to a local record
class and refuses every other global, so reading an untrusted LMDB cannot execute code.

Pixel limit (every cover read: encode, `index --add-images`, uploads to `pixelrec serve`): an image
is opened lazily, its size read from the header, and one whose size *as it would be decoded* is
above `MAX_IMAGE_PIXELS` (40 megapixels) fails with reason "image too large (W x H); ..." before a
single pixel is decoded, so a decompression bomb (a tiny file claiming 20000 x 20000 pixels) costs
nothing. A JPEG larger than the cap still loads when the caller passes `max_side`: its decoding is
reduced by 2, 4 or 8 (`Image.draft`) to no less than `max_side`. Pillow's own bomb check (a
process-wide setting) is left as it is for everyone else; pixelrec bypasses it only while Pillow
parses a header, under a lock, and turns Pillow's DecompressionBombError / Warning, should a
format raise one while decoding, into the same reason.
"""

from __future__ import annotations

import abc
import errno
import io
import os
import pickle
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Iterable

import lmdb
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import PixelrecError
from ..runtime import log
from .ids import id_problem, shown

MAX_IMAGE_PIXELS = 40_000_000
"""Largest decoded image (width x height) that `load` accepts: 40 megapixels, 120 MB as RGB. Checked
from the header before decoding (module doc); raise it here for covers larger than that."""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Directory-store extensions, in order of preference when one id has several files."""

LMDB_SPECIAL_KEYS = (b"__keys__", b"__len__")

_PIL_LIMIT_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)


class ImageLoadError(PixelrecError):
    """One item's image could not be loaded; `reason` is short ("missing", "zero-byte file", ...)."""

    def __init__(self, item_id: str, reason: str, where: str):
        self.item_id = item_id
        self.reason = " ".join(str(reason).split())
        self.where = where
        super().__init__(f"item {item_id}: {self.reason} ({where})")

    def __reduce__(self):  # picklable, so it can cross worker-process boundaries
        return (type(self), (self.item_id, self.reason, self.where))


# --------------------------------------------------------------------------------------------
# Decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as an RGB image, upright per its EXIF orientation.

    Transparency is composited onto white; CMYK goes through its embedded ICC profile when it has
    one (else Pillow's standard formula); 16-bit images are scaled to 8 bits (not clipped); 32-bit
    integer images are read as 16-bit when any value exceeds 255; float images are read as [0, 1]
    when their maximum is <= 1, else as [0, 255]. Raises ValueError for modes Pillow cannot convert.
    """
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), "L").convert("RGB")
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken embedded profile: fall back to the plain formula
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0
    elif img.mode == "F":
        scaled = arr * 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else arr
    else:  # "I": 32-bit integers, usually holding 16-bit data
        scaled = arr / 257.0 if arr.size and int(arr.max()) > 255 else arr
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def _open_unlimited(fp: BinaryIO) -> Image.Image:
    """`Image.open` with Pillow's global bomb check off for this header parse only (module doc)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(fp: BinaryIO, max_side: int | None) -> Image.Image:
    """Open (header only), optionally reduce (JPEG), enforce the pixel cap, decode, convert to RGB."""
    img = _open_unlimited(fp)
    original = img.size
    if max_side and img.format == "JPEG":
        img.draft("RGB", (max_side, max_side))
    _check_pixels(img.size, original)  # before decoding: the header's size, reduced by draft
    try:
        img.load()  # inside the caller's try: truncation shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _TooLarge(img.size) from None  # a format whose frames grow while decoding (GIF)
    _check_pixels(img.size, img.size)
    return to_rgb(img)


def _check_pixels(size: tuple[int, int], reported: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise _TooLarge(reported)


class _TooLarge(Exception):
    def __init__(self, size: tuple[int, int]):
        super().__init__(f"image too large ({size[0]} x {size[1]}); the limit is "
                         f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels")


def decode_image_file(path: str | os.PathLike, item_id: str, max_side: int | None = None) -> Image.Image:
    """Decode one image file fully to RGB, or raise ImageLoadError with a distinct reason.

    `max_side` lets JPEG decoding shrink by 2, 4 or 8 while staying >= max_side on both sides.
    """
    where = str(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(item_id, "zero-byte file", where)
        with open(path, "rb") as f:
            return _decode(f, max_side)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(item_id, "missing", where) from None
    except PermissionError as exc:
        raise ImageLoadError(item_id, f"unreadable file: {exc.strerror}", where) from None
    except UnidentifiedImageError:
        raise ImageLoadError(item_id, "not a recognised image format", where) from None
    except _TooLarge as exc:
        raise ImageLoadError(item_id, str(exc), where) from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, ... on bad data
        raise ImageLoadError(item_id, f"corrupt or truncated image: {exc}", where) from None


# --------------------------------------------------------------------------------------------
# Stores


class ImageStore(abc.ABC):
    """Read-only mapping item id -> RGB cover image."""

    source: str

    refused: dict[str, str]  # names that cannot be item ids or covers -> why (listed as failed, not in ids())

    def __init__(self, source: str | os.PathLike, ids: Iterable[str]):
        self.source = str(source)
        self._ids = sorted(ids)
        self._id_set = frozenset(self._ids)

    def ids(self) -> list[str]:
        """Every item id the store holds, sorted."""
        return list(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._id_set

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    @abc.abstractmethod
    def load(self, item_id: str, max_side: int | None = None) -> Image.Image:
        """The item's image, fully decoded, RGB. `max_side` is a hint: decoding may be reduced
        (JPEG) but the result stays >= max_side on both sides when the original is."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what the store is, for logs and error messages."""


class DirImageStore(ImageStore):
    """A directory of `<item_id>.<ext>` covers, ext in jpg/jpeg/png/webp (any case).

    Hidden files and entries without an image extension are ignored. When one id has several
    files, the first of jpg > jpeg > png > webp wins; `duplicates` maps such ids to all their file
    names. An image-named entry that cannot be an item's cover is not listed in `ids()` but in
    `refused` (name -> reason): a file name the id rule refuses (`data.ids`), a FIFO, device,
    socket or directory, a broken symbolic link or a loop, and a symbolic link whose target lies
    outside the directory unless `follow_symlinks`.
    """

    def __init__(self, root: str | os.PathLike, follow_symlinks: bool = False):
        self.root = Path(root)
        if not self.root.exists():
            raise PixelrecError(f"{self.root}: image directory not found")
        if not self.root.is_dir():
            raise PixelrecError(f"{self.root}: not a directory of images")
        self.follow_symlinks = follow_symlinks
        self._files, self.duplicates, self.refused = _scan_image_dir(self.root, follow_symlinks)
        if not self._files and not self.refused:
            raise PixelrecError(f"no .jpg/.jpeg/.png/.webp images in {self.root}")
        if self.duplicates:
            example = next(iter(sorted(self.duplicates)))
            log(f"{self.root}: {len(self.duplicates)} item id(s) have several image files, using "
                f"jpg > jpeg > png > webp (e.g. {', '.join(self.duplicates[example])})")
        if self.refused:
            example, reason = next(iter(sorted(self.refused.items())))
            log(f"{self.root}: {len(self.refused)} file(s) cannot be covers and are listed as failed "
                f"(e.g. {shown(example)}: {reason})")
        super().__init__(self.root, self._files)

    def path_of(self, item_id: str) -> Path:
        """The file that `load(item_id)` reads."""
        if item_id not in self._files:
            raise ImageLoadError(item_id, self.refused.get(item_id, "missing"), f"no image file in {self.root}")
        return self.root / self._files[item_id]

    def load(self, item_id: str, max_side: int | None = None) -> Image.Image:
        path = self.path_of(item_id)
        kind = _not_a_file(path, self.root, self.follow_symlinks)  # replaced since the scan?
        if kind is not None:
            raise ImageLoadError(item_id, kind, str(path))
        return decode_image_file(path, item_id, max_side)

    def describe(self) -> str:
        return f"image directory {self.root} ({len(self)} images)"


def _scan_image_dir(root: Path, follow_symlinks: bool
                    ) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    found: dict[str, list[tuple[int, str]]] = {}
    refused: dict[str, str] = {}
    with os.scandir(root) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            ext = ext.lower()
            if not dot or not stem or entry.name.startswith(".") or ext not in IMAGE_EXTENSIONS:
                continue
            # a regular file needs no stat (the directory entry says so); anything else is looked at
            why = None if entry.is_file(follow_symlinks=False) else _not_a_file(Path(entry.path), root, follow_symlinks)
            if why is None and (problem := id_problem(stem)) is not None:
                why = f"the file name is not a valid item id: {shown(stem)} {problem}"
            if why is None:
                found.setdefault(stem, []).append((IMAGE_EXTENSIONS.index(ext), entry.name))
            else:
                refused[stem] = why
    files: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    for item_id, candidates in found.items():
        candidates.sort()
        files[item_id] = candidates[0][1]
        if len(candidates) > 1:
            duplicates[item_id] = [name for _, name in candidates]
        refused.pop(item_id, None)  # another file of the same id is a cover
    return files, duplicates, refused


def _not_a_file(path: Path, root: Path, follow_outside: bool) -> str | None:
    """Why the directory entry `path` cannot be read as a cover (None: a regular file, or a symbolic
    link to one inside `root`, or anywhere when `follow_outside`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
        return f"{kind}, not a regular file"
    if not follow_outside and os.path.islink(path):
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            return "symbolic link to a file outside the covers folder (not followed without --follow-symlinks)"
    return None


class LmdbImageStore(ImageStore):
    """PixelRec's LMDB store (`code/generate_lmdb.py`): key = item id, value = pickled LMDB_Image.

    `ids()` are the stored image keys plus any id listed in `__keys__` without a record (PixelRec's
    script lists items whose image failed there too); loading such an id raises ImageLoadError,
    and `listed_without_record` names them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = f"LMDB {self.path}"
        try:
            with _environment(self.path).begin() as txn:
                stored = [k for k in txn.cursor().iternext(keys=True, values=False) if k not in LMDB_SPECIAL_KEYS]
                listed_raw = txn.get(b"__keys__")
        except lmdb.Error as exc:
            raise PixelrecError(f"{self.path}: cannot read LMDB image store: {exc}") from None
        self.refused: dict[str, str] = {}  # keys the id rule refuses -> reason (listed as failed)
        stored_ids = self._valid_ids(stored)
        listed_ids = set()
        if listed_raw is not None:
            listed = _safe_unpickle(listed_raw, "__keys__", where)
            if not isinstance(listed, list):
                raise PixelrecError(f"{self.path}: __keys__ is not a list of keys")
            listed_ids = self._valid_ids(k if isinstance(k, bytes) else str(k).encode() for k in listed)
        self.listed_without_record = sorted(listed_ids - stored_ids)
        if self.refused:
            example, reason = next(iter(sorted(self.refused.items())))
            log(f"{self.path}: {len(self.refused)} key(s) are not valid item ids and are listed as failed "
                f"(e.g. {reason})")
        super().__init__(self.path, stored_ids | listed_ids)

    def _valid_ids(self, keys: Iterable[bytes]) -> set[str]:
        valid = set()
        for key in keys:
            name, why = _key_problem(key)
            if why is None:
                valid.add(name)
            else:
                self.refused[name] = why
        return valid

    def load(self, item_id: str, max_side: int | None = None) -> Image.Image:
        where = f"LMDB {self.path}"
        if item_id in self.refused:
            raise ImageLoadError(item_id, self.refused[item_id], where)
        with _environment(self.path).begin() as txn:
            raw = txn.get(str(item_id).encode("utf-8"))
        if raw is None:
            reason = "listed in __keys__ but has no record" if item_id in self else "missing"
            raise ImageLoadError(item_id, reason, where)
        record = _safe_unpickle(raw, item_id, where)
        try:
            return to_rgb(_record_to_image(record))
        except _TooLarge as exc:
            raise ImageLoadError(item_id, str(exc), where) from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ImageLoadError(item_id, f"corrupt LMDB record: {exc}", where) from None

    def describe(self) -> str:
        return f"LMDB image store {self.path} ({len(self)} images)"


_ENVS: dict[tuple, tuple[int, lmdb.Environment]] = {}
_ENVS_LOCK = threading.Lock()


def _environment(path: Path) -> lmdb.Environment:
    """This process's read-only environment for the LMDB at `path`, shared by every store object.

    py-lmdb refuses to open one environment twice in a process, and a forked child (a DataLoader
    worker) must not use its parent's: the inherited handle is closed and the LMDB reopened. The
    cache is keyed by the data file's identity, so a rewritten LMDB is opened afresh.
    """
    subdir = path.is_dir()
    data_file = path / "data.mdb" if subdir else path
    try:
        st = os.stat(data_file)
        key = (st.st_dev, st.st_ino, os.path.realpath(data_file))
        with _ENVS_LOCK:
            pid, env = _ENVS.get(key, (None, None))
            if env is not None and pid == os.getpid():
                return env
            if env is not None:
                env.close()
            env = lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False,
                            meminit=False, max_readers=2048)
            _ENVS[key] = (os.getpid(), env)
            return env
    except (lmdb.Error, OSError) as exc:
        raise PixelrecError(
            f"{path}: cannot open as an LMDB image store ({exc}); expected an LMDB written by "
            f"PixelRec's generate_lmdb.py or a directory of images") from None


def _key_problem(key: bytes) -> tuple[str, str | None]:
    """(the key as an item id, why it cannot be one or None)."""
    try:
        name = key.decode("utf-8")
    except UnicodeDecodeError:
        return key.decode("utf-8", "backslashreplace"), f"the LMDB key {key!r} is not UTF-8"
    problem = id_problem(name)
    return name, None if problem is None else f"the LMDB key is not a valid item id: {shown(name)} {problem}"


class _LmdbRecord:
    """Stands in for PixelRec's `LMDB_Image` when unpickling (attributes only, no code)."""


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class _RecordUnpickler(pickle.Unpickler):
    """Allows only `LMDB_Image` (from any module) and the helpers old pickle protocols use."""

    _ALLOWED = {("copyreg", "_reconstructor"), ("builtins", "object"), ("_codecs", "encode")}
    _PY2_NAMES = {"copy_reg": "copyreg", "__builtin__": "builtins"}  # protocol 0/1 pickles

    def find_class(self, module: str, name: str):
        if name == "LMDB_Image":
            return _LmdbRecord
        module = self._PY2_NAMES.get(module, module)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"unsafe pickle refused: it references {module}.{name}")


def _safe_unpickle(raw: bytes, item_id: str, where: str) -> object:
    try:
        obj = _RecordUnpickler(io.BytesIO(raw)).load()
    except _RefusedGlobal as exc:
        reason = str(exc)
    except Exception as exc:  # malformed pickles raise many types; none of them may escape raw
        reason = f"corrupt LMDB record: {type(exc).__name__}: {exc}"
    else:
        return obj
    if item_id == "__keys__":
        raise PixelrecError(f"{where}: cannot read __keys__: {reason}")
    raise ImageLoadError(item_id, reason, where)


def _record_to_image(record: object) -> Image.Image:
    if not isinstance(record, _LmdbRecord):
        raise ValueError(f"expected an LMDB_Image object, got {type(record).__name__}")
    height, width = (int(v) for v in record.size[:2])
    channels = int(getattr(record, "channels", record.size[2] if len(record.size) > 2 else 1))
    data = record.image
    if channels not in (1, 3, 4):
        raise ValueError(f"{channels} channels (expected 1, 3 or 4)")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"image data is {type(data).__name__}, expected bytes")
    if len(data) != height * width * channels:
        raise ValueError(f"{len(data)} bytes for a {height}x{width}x{channels} uint8 image")
    if height * width > MAX_IMAGE_PIXELS:
        raise _TooLarge((width, height))
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


# --------------------------------------------------------------------------------------------
# Opening


def open_image_store(path: str | os.PathLike, follow_symlinks: bool = False) -> ImageStore:
    """An LmdbImageStore for an LMDB (a directory holding data.mdb, a file, or a name ending
    .lmdb), else a DirImageStore for a directory of covers (`follow_symlinks`: also read covers
    that are symbolic links to files outside it)."""
    path = Path(path)
    if not path.exists():
        raise PixelrecError(f"{path}: image store not found (expected a directory of <item_id>.jpg "
                            f"covers or an LMDB image store)")
    if path.is_file() or path.suffix.lower() == ".lmdb" or (path / "data.mdb").is_file():
        return LmdbImageStore(path)
    return DirImageStore(path, follow_symlinks)
