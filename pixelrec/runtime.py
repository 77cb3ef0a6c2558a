"""Small runtime helpers shared by every stage: device choice, precision, seeding, progress bars,
durable atomic writes, lock files and the wording of operating-system errors.

Nothing here knows about recommendation; it only keeps the stages consistent with each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import PixelrecError

# Progress bars are on unless silenced (CLI --quiet, or PIXELREC_QUIET=1 for tests and scripts).
_QUIET = os.environ.get("PIXELREC_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that honours the global quiet switch."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=_QUIET, **kwargs)


def log(message: str) -> None:
    """Status line for long steps, on stderr so stdout stays clean for --json (silenced with progress bars)."""
    if not _QUIET:
        tqdm.write(message, file=sys.stderr)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for cuda without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PixelrecError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise PixelrecError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain float32.

    auto: bf16 on a CUDA device that supports it, else fp16 on CUDA, float32 on CPU; fp32: never
    autocast; bf16 / fp16: that dtype on CUDA (CPU runs stay float32: CPU autocast is slower there).
    """
    if precision not in PRECISIONS:
        raise PixelrecError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast context for `precision` on `device` (see `autocast_dtype`); a no-op for float32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler_for(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (fp16 gradients underflow without it); disabled otherwise."""
    enabled = autocast_dtype(device, precision) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; publish it under `path` only if the block succeeds.

    The temporary file is flushed to disk (fsync) before the rename and the directory after it, so
    after a crash or power loss `path` holds either the old content or the whole new one: readers
    never see a half-written file under the final name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give ordinary permissions
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync directories
            raise
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (pretty, stable key order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def plain_data(obj: Any) -> Any:
    """`obj` as plain data (dicts, lists, str, int, float, bool, None): numpy scalars and arrays become
    numbers and lists, so a weights_only load (see `load_tensors`) rebuilds it."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------ locks


class FileLock:
    """An exclusive, non-blocking lock on `path` (fcntl.flock), independent of HDF5's own locking.

    Held for as long as a process writes something (a cache, a run directory); a second process
    asking for the same lock fails at once with a PixelrecError naming the holder's pid. The kernel
    releases the lock when the holder dies (kill -9 included), so a stale lock file never blocks.
    The lock file is removed on release; acquisition checks that the file it locked is still the
    one under `path`, so removing it never lets two processes hold the lock.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what  # e.g. "the cache out.h5", for messages
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError as exc:
                blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
                if blocker is not None:
                    raise PixelrecError(f"cannot write {self.what}: {blocker} is a file, not a directory") from None
                exc.filename = None
                raise PixelrecError(f"cannot write {self.what}: {describe_os_error(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise PixelrecError(f"{self.what} is in use by another pixelrec process{holder}; "
                                    f"wait for it to finish or stop it, then rerun") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        except OSError:  # a full disk: the lock holds without the holder's note (the write that needs room says so)
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The descriptor holding the lock (None when not held); a forked child that must not keep
        the lock alive after this process dies closes its inherited copy of it."""
        return self._fd

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 100, 0).decode(errors="replace").split()
    except OSError:
        return ""
    return f" (pid {text[0]}, since {text[1]})" if len(text) >= 2 else ""


def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock file that guards `target` (a file or a directory): `.<name>.lock` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


# ------------------------------------------------------------------------------ OS errors

_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on device; free space and rerun",
    errno.EDQUOT: "disk quota exceeded; free space and rerun",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a parent of this path is not a directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTEMPTY: "directory not empty",
    errno.EEXIST: "already exists",
    errno.EMFILE: "too many open files",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (failing disk or network file system)",
    errno.ENOMEM: "out of memory",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the path it concerns and what the errno means, with advice."""
    number = exc.errno
    if number is None:  # h5py and others put the errno only in the message
        text = str(exc)
        for candidate, name in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                                (errno.EACCES, "Permission denied"), (errno.EDQUOT, "quota")):
            if name in text:
                number = candidate
                break
    words = _ERRNO_WORDS.get(number) if number is not None else None
    if words is None:
        words = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {words}" if where else words


# ------------------------------------------------------------------------------ full disks

_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
_WRITE_ERROR_PATH = re.compile(r"write error in (.+?): \d+ != \d+")  # faiss's wording


def disk_full_error(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `exc`, else None.

    torch.save and faiss report a full disk as a RuntimeError: torch.save writing to a Python file
    chains the file's OSError (as __cause__ or __context__), faiss puts the strerror in its message
    ("write error in PATH: ... (No space left on device)"). Both are turned back into the OSError.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        number = current.errno if isinstance(current, OSError) else None
        if number in _DISK_FULL:
            return current  # type: ignore[return-value]
        if number is None:  # RuntimeErrors, and h5py's OSErrors that carry the errno only in their text
            text = str(current)
            for candidate, words in _DISK_FULL.items():
                if words in text:
                    where = _WRITE_ERROR_PATH.search(text)
                    return OSError(candidate, words, where.group(1) if where else getattr(current, "filename", None))
        current = current.__cause__ or current.__context__
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is (or wraps) a full disk or an exceeded quota (see `disk_full_error`)."""
    return disk_full_error(exc) is not None


def save_tensors(obj: Any, path: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """torch.save through a Python file, so a full disk surfaces as OSError(ENOSPC) naming `shown`
    (default `path`; e.g. the final name of a temporary file)."""
    try:
        with open(path, "wb") as handle:
            torch.save(obj, handle)
    except (RuntimeError, OSError) as exc:
        full = disk_full_error(exc)
        if full is None:
            raise
        raise OSError(full.errno, full.strerror, str(shown or path)) from None


# ------------------------------------------------------------------------------ tensor files

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch's wording of a refused class or function


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu", what: str = "file", fix: str = "") -> Any:
    """torch.load of a file a user handed over, with weights_only=True: only tensors and plain data
    (dicts, lists, numbers, strings) are rebuilt, so no pickled object can run code.

    A file holding anything else is refused in one line naming it (`fix`: what to do instead); a
    damaged one too. OSErrors pass through (the CLI words them).
    """
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols and TorchScript zips
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        found = _REFUSED_GLOBAL.search(text)
        if found is None:  # garbage, or pickle opcodes the weights_only reader does not take
            raise PixelrecError(f"{path}: cannot read {what}: not a torch file of tensors and plain data, or "
                                f"damaged{'; ' + fix if fix else ''}") from None
        raise PixelrecError(f"{path}: {what} holds Python objects besides tensors and plain data (it references "
                            f"{found.group(1)}), which pixelrec never unpickles (they can run code)"
                            f"{'; ' + fix if fix else ''}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a damaged file
        text = " ".join(str(exc).split())
        raise PixelrecError(f"{path}: cannot read {what}: not a torch file, or damaged "
                            f"({type(exc).__name__}: {text[:200]})") from None
