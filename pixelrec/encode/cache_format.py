"""The embedding cache's file format: constants, the settings a cache records, block checksums and
the checks of counts and blocks, one-line write errors, and files abandoned after a failed write.

The layout is described in `cache.py`; the writer, reader and verification live beside this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np

from ..errors import PixelrecError
from ..runtime import describe_os_error



FORMAT_VERSION = 2  # 2: per-block checksums (the `blocks` dataset); 1: counts only, still readable
CHECKSUM = "crc32"
PARTIAL_SUFFIX = ".partial"
EMBEDDING_CHUNK_ROWS = 256
TOKEN_CHUNK_BYTES = 64 * 1024  # aim for ~64 KiB token chunks: 1..16 items each
STRING_CHUNK_ROWS = 1024
BLOCK_CHUNK_ROWS = 1024
BLOCK_DTYPE = np.dtype([("end_position", "<i8"), ("rows", "<i8"), ("failed", "<i8"), ("crc32", "<u4")])
_STR = h5py.string_dtype("utf-8")
# Write failures after which the same command can resume once the cause is gone (None: unknown).
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_RESUMABLE_ERRNOS = _SPACE_ERRNOS | {errno.EIO, None}

# Attributes that identify what a cache holds; a resumed or reused cache must agree on all of them.
SETTING_ATTRS = (
    "model",
    "pretrained",
    "pooling",
    "preset",
    "image_size",
    "dim",
    "split_block",
    "embedding_dtype",
    "normalized",
    "weights_sha256",
    "items_sha256",
    "hidden",
    "hidden_taps",
)
# What makes two caches interchangeable for a trained tower: the same encoder, weights and layout
# (the item set may differ, e.g. a new dataset's covers through the same encoder).
# (the per-layer states are extra inputs that only a `side` tower reads; it checks its taps itself)
IDENTITY_ATTRS = tuple(a for a in SETTING_ATTRS if a not in ("items_sha256", "hidden", "hidden_taps"))
# Per-row datasets besides item_ids, in checksum order (tokens and hidden are optional).
ROW_ARRAYS = ("embeddings", "tokens", "hidden")


def partial_path(out: str | os.PathLike) -> Path:
    """Where an unfinished cache for `out` lives."""
    return Path(str(out) + PARTIAL_SUFFIX)


def _native(value: Any) -> Any:
    """h5py attribute value -> plain Python."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _describe(key: str, value: Any) -> str:
    if key == "split_block":
        return f"split block {value}" if value else "no tokens"
    if key == "items_sha256":
        return "another item set"
    if key == "weights_sha256":
        return f"encoder weights {str(value)[:12]}"
    if key == "hidden":
        return f"per-layer states {value}" if value else "no per-layer states"
    if key == "hidden_taps":
        return f"taps {value}" if value else "no taps"
    if key == "normalized":
        return "normalized embeddings" if value else "unnormalized embeddings"
    return f"{key} {value}"


def settings_mismatch(path: str | os.PathLike, have: dict, want: dict, verb: str = "asks for") -> Optional[str]:
    """First difference between a cache's settings and wanted ones, as a sentence, else None."""
    for key in SETTING_ATTRS:
        if key in want and key in have and _native(have[key]) != _native(want[key]):
            if key == "items_sha256":
                return (
                    f"{path} was built for another item set ({have.get('n_catalogue', '?')} items), "
                    f"this run {verb} {want.get('n_catalogue', '?')} items"
                )
            return f"{path} was built with {_describe(key, have[key])}, this run {verb} {_describe(key, want[key])}"
    return None


# ---- checksums ------------------------------------------------------------------------------------


def _strings(values: Iterable[str]) -> bytes:
    """Strings as one byte string; NUL cannot occur in an HDF5 string, so the join is unambiguous."""
    return "\0".join(values).encode("utf-8")


def block_checksum(
    item_ids: Sequence[str],
    embeddings: np.ndarray,
    tokens: Optional[np.ndarray],
    failed_item_ids: Sequence[str],
    failed_reasons: Sequence[str],
    hidden: Optional[np.ndarray] = None,
) -> int:
    """zlib.crc32 of one block exactly as stored: item ids (utf-8, NUL-separated), the embedding,
    token and per-layer state bytes in the datasets' dtypes, then the failed ids and reasons."""
    crc = zlib.crc32(_strings(item_ids))
    crc = zlib.crc32(np.ascontiguousarray(embeddings), crc)
    for rows in (tokens, hidden):
        if rows is not None:
            crc = zlib.crc32(np.ascontiguousarray(rows), crc)
    crc = zlib.crc32(_strings(failed_item_ids), crc)
    return zlib.crc32(_strings(failed_reasons), crc)


def _stored_checksum(f: h5py.File, rows: slice, failed: slice) -> int:
    """`block_checksum` of the rows and failures as the file holds them."""
    return block_checksum(
        f["item_ids"].asstr()[rows],
        f["embeddings"][rows],
        f["tokens"][rows] if "tokens" in f else None,
        f["failed_item_ids"].asstr()[failed],
        f["failed_reasons"].asstr()[failed],
        f["hidden"][rows] if "hidden" in f else None,
    )


def _row_span(start: int, stop: int) -> str:
    if stop - start == 1:
        return f"row {start}"
    return f"rows {start}-{stop - 1}" if stop > start else "no rows"


def _committed_blocks(f: h5py.File) -> np.ndarray:
    """The block records the header commits (records past `n_blocks` were never committed)."""
    n_blocks = int(f.attrs.get("n_blocks", 0))
    return f["blocks"][:n_blocks] if "blocks" in f else np.empty(0, dtype=BLOCK_DTYPE)


@dataclass
class _BadBlock:
    index: int
    rows: tuple[int, int]  # [start, stop)
    reason: str


def _check_block(f: h5py.File, blocks: np.ndarray, index: int, row0: int, failed0: int) -> Optional[_BadBlock]:
    """Recompute block `index` (starting at row `row0`, failure `failed0`) from the file; None if it matches."""
    block = blocks[index]
    rows = (row0, row0 + int(block["rows"]))
    failed_stop = failed0 + int(block["failed"])
    lengths = [f[name].shape[0] for name in ("item_ids", *ROW_ARRAYS) if name in f]
    if rows[1] > min(lengths) or failed_stop > min(f["failed_item_ids"].shape[0], f["failed_reasons"].shape[0]):
        return _BadBlock(index, rows, f"block {index} ({_row_span(*rows)}) is missing from the datasets")
    try:
        crc = _stored_checksum(f, slice(*rows), slice(failed0, failed_stop))
    except (OSError, RuntimeError) as exc:
        return _BadBlock(index, rows, f"block {index} ({_row_span(*rows)}) cannot be read ({_failure(exc)[1]})")
    if crc != int(block["crc32"]):
        return _BadBlock(index, rows, f"block {index} ({_row_span(*rows)}) does not match its checksum")
    return None


def _bad_blocks(f: h5py.File, blocks: np.ndarray, indices: Optional[Iterable[int]] = None) -> Iterator[_BadBlock]:
    """The blocks (all, or those of `indices`, in order) whose stored content differs from their checksum."""
    row_starts = np.concatenate([[0], np.cumsum(blocks["rows"])]).astype(np.int64)
    failed_starts = np.concatenate([[0], np.cumsum(blocks["failed"])]).astype(np.int64)
    for index in range(len(blocks)) if indices is None else sorted(indices):
        bad = _check_block(f, blocks, index, int(row_starts[index]), int(failed_starts[index]))
        if bad is not None:
            yield bad


def _first_bad_block(f: h5py.File, blocks: np.ndarray) -> Optional[_BadBlock]:
    """The first block whose stored content differs from its checksum, else None."""
    return next(_bad_blocks(f, blocks), None)


def _count_problems(f: h5py.File, committed_only: bool = False) -> list[str]:
    """Disagreements between the header's counts, the dataset lengths and the block records.

    committed_only: an unfinished file may hold rows past its committed ones (dropped on resume).
    """
    attrs = f.attrs
    n_rows, n_failed = int(attrs.get("n_rows", -1)), int(attrs.get("n_failed", -1))
    positions, n_catalogue = int(attrs.get("positions_done", -1)), int(attrs.get("n_catalogue", -1))
    problems = []
    for names, count, what in ((("item_ids", *ROW_ARRAYS), n_rows, "rows"),
                               (("failed_item_ids", "failed_reasons"), n_failed, "failed items")):
        for name in names:
            if name in f:
                length = f[name].shape[0]
                if length < count or (length > count and not committed_only):
                    problems.append(f"{name} holds {length} entries, the header counts {count} {what}")
    if positions != n_rows + n_failed:
        problems.append(f"the header counts {n_rows} rows and {n_failed} failed items "
                        f"for {positions} catalogue positions")
    if bool(attrs.get("complete", False)) and positions != n_catalogue:
        problems.append(f"marked complete after {positions} of {n_catalogue} catalogue items")
    if int(attrs.get("format_version", 1)) >= 2:
        blocks = _committed_blocks(f)
        if len(blocks) != int(attrs.get("n_blocks", -1)):
            problems.append(f"{len(blocks)} block records for the {int(attrs.get('n_blocks', -1))} the header counts")
        elif (int(blocks["rows"].sum()), int(blocks["failed"].sum())) != (n_rows, n_failed):
            problems.append(f"the blocks add up to {int(blocks['rows'].sum())} rows and "
                            f"{int(blocks['failed'].sum())} failed items, the header counts {n_rows} and {n_failed}")
        elif len(blocks) and int(blocks["end_position"][-1]) != positions:
            problems.append(f"the last block ends at position {int(blocks['end_position'][-1])}, "
                            f"the header at {positions}")
    return problems


def _quick_problem(f: h5py.File) -> Optional[str]:
    """Cheap consistency check of a complete cache: counts, and the checksum of its last blocks."""
    problems = _count_problems(f)
    if problems:
        return problems[0]
    blocks = _committed_blocks(f)
    last: set[int] = set()  # the last block, and the last one holding rows
    if len(blocks):
        last.add(len(blocks) - 1)
        with_rows = np.flatnonzero(blocks["rows"])
        if len(with_rows):
            last.add(int(with_rows[-1]))
    bad = next(_bad_blocks(f, blocks, last), None)
    return bad.reason if bad else None


# ---- write errors ---------------------------------------------------------------------------------


def _failure(exc: BaseException) -> tuple[Optional[int], str]:
    """(errno or None, one-line wording) of a failed file operation, from the OS or from HDF5.

    HDF5 reports the errno of a failed write only inside its message ("errno = 28").
    """
    number = exc.errno if isinstance(exc, OSError) else None
    if number is None:
        match = re.search(r"errno = (\d+)", str(exc))
        number = int(match.group(1)) if match else None
    if number is not None:
        return number, describe_os_error(OSError(number, os.strerror(number)))
    text = " ".join(str(exc).split())
    words = describe_os_error(OSError(text))
    return None, (words.split(" (")[0] if words == text else words)  # drop HDF5's long parenthesis


def _write_error(path: Path, exc: BaseException, resumable: bool) -> PixelrecError:
    """One line naming the file and the errno-specific cause; resume advice only where it helps."""
    number, words = _failure(exc)
    if resumable and number in _RESUMABLE_ERRNOS:
        tail = "the same command to resume"
        words = f"{words} {tail}" if words.endswith("rerun") else f"{words}; rerun {tail}"
    return PixelrecError(f"{path}: cannot write the cache: {words}")


@contextlib.contextmanager
def _write_errors(path: Path, resumable: bool = True) -> Iterator[None]:
    """Turn OS and HDF5 write failures into a one-line PixelrecError naming `path`."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise _write_error(path, exc, resumable) from None


# Files whose close failed after a write error, by (device, inode). HDF5 keeps such a file open in
# a broken state: touching it again can crash the process, and any later open of the same file in
# this process would get that state back. So it is never touched again (the reference also keeps
# Python from freeing it, which would touch it), and the file is not reopened in this process.
_ABANDONED: dict[tuple[int, int], h5py.File] = {}


def _file_key(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of the file at `path`, None if there is none."""
    with contextlib.suppress(OSError):
        found = os.stat(path)
        return found.st_dev, found.st_ino
    return None


def _close_quietly(f: h5py.File, path: Path) -> None:
    """Close after a write failure without raising; a file HDF5 cannot close is abandoned."""
    key = _file_key(path)
    try:
        f.close()
    except (OSError, RuntimeError):
        if key is not None:
            _ABANDONED[key] = f


class HeldByFailedWriter(PixelrecError):
    """The file's writer failed earlier in this process and HDF5 could not close it."""


def _refuse_abandoned(path: Path) -> None:
    """Refuse to reopen a file whose writer failed and could not be closed in this process."""
    if _file_key(path) in _ABANDONED:
        raise HeldByFailedWriter(f"{path}: a write to this file failed earlier in this process and HDF5 still "
                                 f"holds it; rerun in a new process (e.g. the pixelrec command) to resume")


def _open_for_writing(path: Path, mode: str) -> h5py.File:
    """Open without a chunk cache: dataset writes go to the file at once and fail where they fail."""
    _refuse_abandoned(path)
    return h5py.File(path, mode, rdcc_nbytes=0)


class UnusablePartial(PixelrecError):
    """`<out>.partial` cannot be resumed (unreadable, or written before block checksums)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot resume the unfinished cache ({reason}); use --overwrite to start again")
        self.path = path
        self.reason = reason




def read_cache_attrs(path: str | os.PathLike, advice: str = "") -> dict[str, Any]:
    """Attributes of a pixelrec cache file (complete or partial); PixelrecError for anything else."""
    _refuse_abandoned(Path(path))
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _native(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise PixelrecError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]}){advice}") from None
    if "format_version" not in attrs:
        raise PixelrecError(f"{path}: not a pixelrec embedding cache{advice}")
    return attrs
