"""The HDF5 embedding cache: what `encode` writes and `fit` / `index` read.

Layout of a complete cache file:

    item_ids          [N]          utf-8 strings, the encoded items in catalogue (sorted id) order
    embeddings        [N, E]       float16 (default) or float32, row i belongs to item_ids[i]
    tokens            [N, T, W]    optional, same dtype: activations entering the last `split_block`
                                   blocks (ViT: T tokens incl. the class token, width W; ResNet, Swin,
                                   ConvNeXt: the feature map's H x W positions, W channels last)
    failed_item_ids   [F]          utf-8 strings: items whose image could not be encoded ...
    failed_reasons    [F]          ... and why ("missing", "zero-byte file", "corrupt ...")
    blocks            [B]          one record per committed block (batch), in order (BLOCK_DTYPE):
                                   end_position (catalogue position after it), rows, failed and crc32,
                                   the checksum of the block's item ids, embeddings, tokens, failed
                                   ids and reasons (see `block_checksum`); absent in format 1
    top_blocks/       group        with tokens: float32 weights of the last K blocks and the pooling
                                   head, one dataset per state_dict key; attrs model_config, k, pooling
                                   (+ family, grid, windows for non-ViT towers: `families.StageTop`)
    attrs             model, pretrained, image_size, dim, normalized, created, pixelrec_version,
                      pooling, preset, model_config (json), preprocess (json), embedding_dtype,
                      split_block (0 = no tokens), weights_sha256, items_sha256, n_catalogue,
                      positions_done, n_rows, n_failed, n_blocks, checksum ("crc32"),
                      format_version, complete

Writing (`CacheWriter`) goes to `<out>.partial`, opened without HDF5's chunk cache so every dataset
write reaches the file at once and a failure (disk full, read-only, I/O error) is raised where it
happens, as a one-line PixelrecError. Each batch is one block: its rows, its failures and its block
record are written, then `positions_done` / `n_rows` / `n_failed` / `n_blocks` commit it, then the
file is flushed, so a killed process loses at most the block in flight. `resume()` re-verifies
every committed block against its checksum and drops anything after the last good one (copying
the good blocks into a fresh file when a failed write left HDF5 unable to cut the file back).
`finish()` flushes and fsyncs the file, re-reads and verifies every block (a write that failed
silently is never published), then sets `complete`, fsyncs again and renames the file onto `<out>`;
`open_cache` refuses anything without `complete`, or whose counts or last block do not add up.
`verify_cache` checks every block of a file on demand.

Caches of format 1 (written before block checksums) still open: only their counts are checked.

Reading (`EmbeddingCache`) reads rows on demand (arbitrary, unsorted, repeated row arrays) unless
`in_memory=True`; a large cache is never loaded whole unless asked. Token rows, the `partial`
tower's hot path, are read through a memory map of the file at each chunk's byte offset (one copy
per distinct row, no HDF5 selection; `_MappedRows`), other datasets by chunks.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from ..errors import PixelrecError
from ..runtime import describe_os_error, fsync_path, log
from .encoder import TopBlocks
from .families import StageTop, family_label, family_of_model

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
)
# What makes two caches interchangeable for a trained tower: the same encoder, weights and layout
# (the item set may differ, e.g. a new dataset's covers through the same encoder).
IDENTITY_ATTRS = tuple(a for a in SETTING_ATTRS if a != "items_sha256")


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
) -> int:
    """zlib.crc32 of one block exactly as stored: item ids (utf-8, NUL-separated), the embedding and
    token bytes in the datasets' dtypes, then the failed ids and reasons."""
    crc = zlib.crc32(_strings(item_ids))
    crc = zlib.crc32(np.ascontiguousarray(embeddings), crc)
    if tokens is not None:
        crc = zlib.crc32(np.ascontiguousarray(tokens), crc)
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
    lengths = [f[name].shape[0] for name in ("item_ids", "embeddings", "tokens") if name in f]
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
    for names, count, what in ((("item_ids", "embeddings", "tokens"), n_rows, "rows"),
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


# ---- writing --------------------------------------------------------------------------------------


def _extend(dataset: h5py.Dataset, start: int, data: np.ndarray) -> None:
    """Write `data` at rows start.. of a resizable dataset, growing it to fit exactly."""
    if len(data):
        dataset.resize(start + len(data), axis=0)
        dataset[start : start + len(data)] = data


def _create_layout(
    f: h5py.File,
    attrs: dict[str, Any],
    dim: int,
    embedding_dtype: np.dtype,
    token_shape: Optional[tuple[int, int]],
    top_blocks: Optional[TopBlocks],
    top_state: Optional[dict[str, np.ndarray]],
) -> None:
    """The empty datasets, header and top-block weights of a fresh cache."""
    f.attrs.update(dict(attrs))
    f.attrs.update(format_version=FORMAT_VERSION, checksum=CHECKSUM, positions_done=0, n_rows=0, n_failed=0,
                   n_blocks=0, complete=False)
    f.create_dataset("item_ids", (0,), maxshape=(None,), dtype=_STR, chunks=(STRING_CHUNK_ROWS,))
    f.create_dataset(
        "embeddings", (0, dim), maxshape=(None, dim), dtype=embedding_dtype, chunks=(EMBEDDING_CHUNK_ROWS, dim)
    )
    f.create_dataset("failed_item_ids", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
    f.create_dataset("failed_reasons", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
    f.create_dataset("blocks", (0,), maxshape=(None,), dtype=BLOCK_DTYPE, chunks=(BLOCK_CHUNK_ROWS,))
    if token_shape is not None:
        t, w = token_shape
        item_bytes = t * w * np.dtype(embedding_dtype).itemsize
        rows = int(min(16, max(1, TOKEN_CHUNK_BYTES // item_bytes)))
        f.create_dataset("tokens", (0, t, w), maxshape=(None, t, w), dtype=embedding_dtype, chunks=(rows, t, w))
    if top_blocks is not None and top_state is not None:
        group = f.create_group("top_blocks")
        group.attrs.update(model_config=top_blocks.config_json, k=top_blocks.k, pooling=top_blocks.pooling)
        group.attrs.update(getattr(top_blocks, "extra_attrs", {}))  # non-ViT towers: family, grid, windows
        for key, value in top_state.items():
            # chunked, so the weights bypass HDF5's sieve buffer and a failed write raises here
            group.create_dataset(key, data=value, chunks=value.shape if value.ndim and value.size else None)


def _reopen_partial(path: Path) -> h5py.File:
    """`path` opened for appending; UnusablePartial when HDF5 cannot open it or it predates checksums."""
    try:
        f = _open_for_writing(path, "r+")
    except (OSError, RuntimeError) as exc:
        raise UnusablePartial(path, _failure(exc)[1]) from None
    if int(f.attrs.get("format_version", 0)) < 2 or "blocks" not in f:
        _close_quietly(f, path)
        raise UnusablePartial(path, "written by an older pixelrec, without block checksums")
    return f


def _good_blocks(f: h5py.File, path: Path, verify: bool) -> np.ndarray:
    """The committed block records, cut before the first block that fails its checksum (with verify)."""
    blocks = _committed_blocks(f)
    if verify:
        bad = _first_bad_block(f, blocks)
        if bad is not None:
            later = len(blocks) - bad.index - 1
            log(f"{path}: {bad.reason}; encoding it{f' and the {later} blocks after it' if later else ''} again")
            blocks = blocks[: bad.index]
    return blocks


def _cut_back(f: h5py.File, blocks: np.ndarray) -> None:
    """Cut every dataset and the header back to exactly `blocks`, the first blocks of the file."""
    n_rows, n_failed = int(blocks["rows"].sum()), int(blocks["failed"].sum())
    for name, length in (("item_ids", n_rows), ("embeddings", n_rows), ("tokens", n_rows),
                         ("failed_item_ids", n_failed), ("failed_reasons", n_failed), ("blocks", len(blocks))):
        if name in f and f[name].shape[0] != length:
            f[name].resize(length, axis=0)
    positions_done = int(blocks["end_position"][-1]) if len(blocks) else 0
    f.attrs.update(n_rows=n_rows, n_failed=n_failed, n_blocks=len(blocks), positions_done=positions_done)
    f.flush()


def _write_block(f: h5py.File, item_ids: np.ndarray, embeddings: np.ndarray, tokens: Optional[np.ndarray],
                 failed_ids: np.ndarray, reasons: np.ndarray, record: np.ndarray) -> None:
    """Append one block's rows, failures and record, then commit it in the header and flush."""
    n_rows, n_failed, n_blocks = (int(f.attrs[name]) for name in ("n_rows", "n_failed", "n_blocks"))
    _extend(f["item_ids"], n_rows, item_ids)
    _extend(f["embeddings"], n_rows, embeddings)
    if tokens is not None:
        _extend(f["tokens"], n_rows, tokens)
    _extend(f["failed_item_ids"], n_failed, failed_ids)
    _extend(f["failed_reasons"], n_failed, reasons)
    _extend(f["blocks"], n_blocks, record)
    f.attrs.update(n_rows=n_rows + len(item_ids), n_failed=n_failed + len(failed_ids), n_blocks=n_blocks + 1,
                   positions_done=int(record["end_position"][0]))
    f.flush()


def _rebuild(path: Path, blocks: np.ndarray) -> None:
    """Replace `path` by a fresh file holding its header, top blocks and first len(blocks) blocks."""
    fresh = path.with_name(path.name + ".rebuild")
    _refuse_abandoned(path)
    with h5py.File(path, "r") as old:
        embeddings = old["embeddings"]
        token_shape = tuple(old["tokens"].shape[1:]) if "tokens" in old else None
        new = _open_for_writing(fresh, "w")
        try:
            _create_layout(new, dict(old.attrs), embeddings.shape[1], embeddings.dtype, token_shape, None, None)
            if "top_blocks" in old:
                old.copy(old["top_blocks"], new)
            row, failed = 0, 0
            for i in range(len(blocks)):
                rows = slice(row, row + int(blocks["rows"][i]))
                fails = slice(failed, failed + int(blocks["failed"][i]))
                _write_block(new, old["item_ids"].asstr()[rows].astype(object), embeddings[rows],
                             old["tokens"][rows] if token_shape else None,
                             old["failed_item_ids"].asstr()[fails].astype(object),
                             old["failed_reasons"].asstr()[fails].astype(object), blocks[i : i + 1])
                row, failed = rows.stop, fails.stop
        except BaseException:
            _close_quietly(new, fresh)
            raise
        new.close()
    fsync_path(fresh)
    os.replace(fresh, path)


class CacheWriter:
    """Appends encoded blocks to `<out>.partial` and publishes it as `<out>` when complete.

    Every method that writes raises a one-line PixelrecError when the write fails; the writer is
    then closed and only a new `resume()` continues.
    """

    def __init__(self, out: Path, file: h5py.File):
        self.out = Path(out)
        self.path = partial_path(out)
        self._f = file
        self._closed = False

    @classmethod
    def create(
        cls,
        out: str | os.PathLike,
        attrs: dict[str, Any],
        dim: int,
        embedding_dtype: np.dtype,
        token_shape: Optional[tuple[int, int]] = None,
        top_blocks: Optional[TopBlocks] = None,
    ) -> "CacheWriter":
        """Start a fresh `<out>.partial` (replacing any previous one)."""
        out = Path(out)
        path = partial_path(out)
        top_state = None
        if top_blocks is not None:
            top_state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in top_blocks.state_dict().items()}
        with _write_errors(path, resumable=False):
            path.parent.mkdir(parents=True, exist_ok=True)
            if _file_key(path) in _ABANDONED:
                path.unlink()  # a new file (inode), unrelated to the one HDF5 still holds
            f = _open_for_writing(path, "w")
            try:
                _create_layout(f, attrs, dim, embedding_dtype, token_shape, top_blocks, top_state)
                f.flush()
            except BaseException:
                _close_quietly(f, path)
                raise
        return cls(out, f)

    @classmethod
    def resume(cls, out: str | os.PathLike, verify: bool = True, fresh: bool = False) -> "CacheWriter":
        """Reopen `<out>.partial` after an interruption (kill, disk full, ...).

        Keeps the committed blocks, each re-read and checked against its checksum unless
        `verify=False` (for a file verified moments ago), and drops everything after the last good
        one. A file HDF5 cannot cut back in place (a failed write can leave its structure pointing
        past the end of the file) is rebuilt from its good blocks in a fresh file; `fresh=True`
        always rebuilds, for a writer that will append: a process killed in the middle of an HDF5
        write can leave the file's internal structures (not its committed rows) in a state that
        reads fine but refuses later writes, so new blocks never go into such a file. Raises
        `UnusablePartial` when the file cannot be read or predates block checksums.
        """
        out = Path(out)
        path = partial_path(out)
        f = _reopen_partial(path)
        blocks = np.empty(0, dtype=BLOCK_DTYPE)
        try:
            blocks = _good_blocks(f, path, verify)
            if fresh:
                _close_quietly(f, path)
                with _write_errors(path):
                    _rebuild(path, blocks)
                return cls(out, _reopen_partial(path))
            _cut_back(f, blocks)
        except (OSError, RuntimeError) as exc:
            _close_quietly(f, path)
            number, words = _failure(exc)
            if number in _SPACE_ERRNOS:
                raise _write_error(path, exc, resumable=True) from None
            log(f"{path}: cannot cut it back to its last good block in place ({words}); "
                f"copying its {len(blocks)} good blocks into a fresh file")
            with _write_errors(path):
                _rebuild(path, blocks)
            f = _reopen_partial(path)
        except BaseException:
            _close_quietly(f, path)
            raise
        return cls(out, f)

    @contextlib.contextmanager
    def _writing(self, resumable: bool = True) -> Iterator[None]:
        """Run writes; on failure close the file (quietly) and raise the one-line error."""
        self._require_open()
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self.close()
            raise _write_error(self.path, exc, resumable) from None

    def _require_open(self) -> None:
        if self._closed:
            raise PixelrecError(f"{self.path}: the cache writer is closed; rerun the same command to resume")

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _native(v) for k, v in self._f.attrs.items()}

    @property
    def positions_done(self) -> int:
        return int(self._f.attrs["positions_done"])

    @property
    def n_rows(self) -> int:
        return int(self._f.attrs["n_rows"])

    @property
    def n_failed(self) -> int:
        return int(self._f.attrs["n_failed"])

    @property
    def n_blocks(self) -> int:
        return int(self._f.attrs["n_blocks"])

    def top_blocks_state(self) -> Optional[dict[str, np.ndarray]]:
        if "top_blocks" not in self._f:
            return None
        group = self._f["top_blocks"]
        return {key: group[key][()] for key in group}

    def failed(self) -> dict[str, str]:
        return dict(zip(self._f["failed_item_ids"].asstr()[:], self._f["failed_reasons"].asstr()[:]))

    def append(
        self,
        item_ids: Sequence[str],
        embeddings: np.ndarray,
        tokens: Optional[np.ndarray],
        failed: Sequence[tuple[str, str]],
        positions_done: int,
    ) -> None:
        """Commit one block: its encoded rows, its failures, its checksum and how far through the
        catalogue we are (every position before `positions_done` is either a row or a failure).
        Nothing of a block whose write fails counts as committed."""
        self._require_open()
        f = self._f
        ids = np.asarray(list(item_ids), dtype=object)
        rows = np.ascontiguousarray(embeddings, dtype=f["embeddings"].dtype)  # exactly the bytes stored
        token_rows = None
        if "tokens" in f and len(ids):
            if tokens is None:
                raise ValueError(f"{self.path} stores tokens: append() needs the tokens of its rows")
            token_rows = np.ascontiguousarray(tokens, dtype=f["tokens"].dtype)
        if len(rows) != len(ids) or (token_rows is not None and len(token_rows) != len(ids)):
            raise ValueError(f"append(): {len(ids)} item ids but {len(rows)} embeddings / "
                             f"{len(ids) if token_rows is None else len(token_rows)} token rows")
        failed_ids = np.asarray([item_id for item_id, _ in failed], dtype=object)
        reasons = np.asarray([reason for _, reason in failed], dtype=object)
        crc = block_checksum(ids, rows, token_rows, failed_ids, reasons)
        record = np.array([(positions_done, len(ids), len(failed), crc)], dtype=BLOCK_DTYPE)
        with self._writing():
            _write_block(f, ids, rows, token_rows, failed_ids, reasons, record)

    def finish(self) -> Path:
        """Publish the cache under its final name once every block is verified on disk; returns it.

        Flushes and fsyncs `<out>.partial`, re-reads it and checks every block against its checksum
        (so a write that failed silently is never published), then sets `complete`, flushes, fsyncs,
        renames the file onto `<out>` and fsyncs the directory.
        """
        if self.positions_done != int(self._f.attrs["n_catalogue"]):
            raise PixelrecError(f"{self.path}: finish() before every item was processed")
        with self._writing():
            self._f.flush()
            self._f.close()
            self._closed = True
            fsync_path(self.path)
        with _write_errors(self.path):
            with h5py.File(self.path, "r") as f:
                problem = (_count_problems(f) or [None])[0]
                bad = None if problem else _first_bad_block(f, _committed_blocks(f))
        problem = problem or (bad.reason if bad else None)
        if problem:
            raise PixelrecError(f"{self.path}: {problem} after writing, so the cache was not published; "
                                f"rerun the same command to encode the damaged rows again")
        with _write_errors(self.path):
            f = _open_for_writing(self.path, "r+")
            try:
                f.attrs["complete"] = True
                f.flush()
            except BaseException:
                _close_quietly(f, self.path)
                raise
            f.close()
            fsync_path(self.path)
            os.replace(self.path, self.out)
            fsync_path(self.out.parent)
        return self.out

    def close(self) -> None:
        """Close without finishing (the partial file stays for a resume); never raises."""
        if not self._closed:
            self._closed = True
            _close_quietly(self._f, self.path)


# ---- reading --------------------------------------------------------------------------------------


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


def _gather(data: h5py.Dataset | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """data[rows] for any int row array (unsorted, repeated), reading an HDF5 dataset by chunks.

    h5py point selection needs increasing unique indices: read those once, then expand. Dense
    requests (span <= 2x the rows asked) become a single contiguous read.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = data.shape[0]
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        bad = rows[(rows < 0) | (rows >= n)][0]
        raise IndexError(f"row {bad} out of range for a cache of {n} rows")
    if isinstance(data, np.ndarray):
        return data[rows]
    if rows.size == 0:
        return np.empty((0, *data.shape[1:]), dtype=data.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 2 * unique.size + 64:
        picked = data[lo:hi][unique - lo]
    else:
        picked = data[unique]
    return picked[inverse]


class _MappedRows:
    """Rows of a chunked, unfiltered HDF5 dataset read straight from a memory map of the file.

    The byte offset of every chunk is looked up once; a row is then one contiguous slice of the map
    (chunks hold whole rows in C order), so a read of scattered rows costs one copy per distinct row
    and no HDF5 selection, and the OS page cache keeps the rows read often (a cache larger than RAM
    stays on disk). `of` returns None where this does not apply (compressed or unallocated chunks)."""

    def __init__(self, path: Path, offsets: np.ndarray, chunk_rows: int, n_rows: int, row_shape: tuple,
                 dtype: np.dtype):
        self.offsets, self.chunk_rows, self.n_rows = offsets, chunk_rows, n_rows
        self.row_shape, self.dtype = row_shape, dtype
        self.row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(self.map, dtype=np.uint8)
        self.rows_at = None  # rows_at[e] = the row starting at element e (a strided view, no copy)
        if not (offsets % dtype.itemsize).any():
            typed = buf[: len(buf) - len(buf) % dtype.itemsize].view(dtype)
            row_strides = tuple(int(np.prod(row_shape[i + 1:])) * dtype.itemsize for i in range(len(row_shape)))
            self.rows_at = np.lib.stride_tricks.as_strided(
                typed, shape=(len(typed) - self.row_bytes // dtype.itemsize + 1, *row_shape),
                strides=(dtype.itemsize, *row_strides), writeable=False)
        self.buf = buf

    @classmethod
    def of(cls, path: Path, ds: h5py.Dataset) -> Optional["_MappedRows"]:
        chunks = ds.chunks
        if (chunks is None or tuple(chunks[1:]) != tuple(ds.shape[1:]) or ds.id.get_create_plist().get_nfilters()
                or ds.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">") or ds.shape[0] == 0
                or ds.file.driver != "sec2"):
            return None
        rows = int(chunks[0])
        offsets = np.full(-(-ds.shape[0] // rows), -1, dtype=np.int64)

        def note(info) -> None:
            offsets[info.chunk_offset[0] // rows] = -1 if info.byte_offset is None else info.byte_offset

        try:
            ds.id.chunk_iter(note)
        except (AttributeError, RuntimeError, ValueError):
            return None
        if (offsets < 0).any():
            return None
        return cls(path, offsets, rows, int(ds.shape[0]), tuple(ds.shape[1:]), ds.dtype)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), *row_shape] for any int row array (unsorted, repeated)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            bad = rows[(rows < 0) | (rows >= self.n_rows)][0]
            raise IndexError(f"row {bad} out of range for a cache of {self.n_rows} rows")
        unique, inverse = np.unique(rows, return_inverse=True)
        starts = self.offsets[unique // self.chunk_rows] + (unique % self.chunk_rows) * self.row_bytes
        if self.rows_at is not None:  # one vectorised copy of every distinct row
            return self.rows_at[starts // self.dtype.itemsize][inverse]
        out = np.empty((len(unique), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(unique), self.row_bytes // self.dtype.itemsize).view(np.uint8)
        for i, start in enumerate(starts.tolist()):
            flat[i] = self.buf[start : start + self.row_bytes]
        return out[inverse]


class EmbeddingCache:
    """A complete HDF5 embedding cache opened for reading (see the module doc for the layout).

    Picklable (worker processes reopen the file) and usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False):
        self.path = Path(path)
        self.in_memory = in_memory
        self._file: Optional[h5py.File] = None
        self._pid: Optional[int] = None
        f = self._h5
        missing = [name for name in ("item_ids", "embeddings", "failed_item_ids", "failed_reasons") if name not in f]
        if missing or "dim" not in f.attrs:
            self.close()
            raise PixelrecError(f"{self.path}: not a pixelrec embedding cache (no {', '.join(missing) or 'dim'})")
        self.attrs: dict[str, Any] = {k: _native(v) for k, v in f.attrs.items()}
        self.item_ids: np.ndarray = f["item_ids"].asstr()[:].astype(object)  # [N] str
        self.dim = int(f["embeddings"].shape[1])
        self.has_tokens = "tokens" in f
        self.split_block: Optional[int] = int(self.attrs.get("split_block") or 0) or None
        self._embeddings: Optional[np.ndarray] = f["embeddings"][:] if in_memory else None
        self._tokens: Optional[np.ndarray] = f["tokens"][:] if in_memory and self.has_tokens else None

    # -- file handle (reopened in forked / unpickled worker processes) --

    @property
    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid() or not self._file.id.valid:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise PixelrecError(f"{self.path}: cannot open as an HDF5 cache: {str(exc).splitlines()[0]}") from None
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state.pop("_token_map", None)  # a memory map is reopened by the process that reads, not copied
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid() and self._file.id.valid:
            self._file.close()
        self._file = None

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        tokens = f", tokens split {self.split_block}" if self.has_tokens else ""
        return f"EmbeddingCache({str(self.path)!r}, {len(self)} x {self.dim}{tokens})"

    # -- ids --

    @cached_property
    def index(self) -> dict[str, int]:
        """item id -> row."""
        return {item_id: row for row, item_id in enumerate(self.item_ids)}

    def rows_for(self, item_ids: Iterable[str]) -> np.ndarray:
        """Rows of the given ids (int64), -1 where an id is not in the cache."""
        index = self.index
        return np.fromiter((index.get(i, -1) for i in item_ids), dtype=np.int64)

    @cached_property
    def failed(self) -> dict[str, str]:
        """item id -> reason, for every item whose image could not be encoded."""
        f = self._h5
        return dict(zip(f["failed_item_ids"].asstr()[:], f["failed_reasons"].asstr()[:]))

    # -- data --

    @property
    def embedding_dtype(self) -> np.dtype:
        return self._h5["embeddings"].dtype

    @property
    def token_shape(self) -> Optional[tuple[int, int]]:
        """(T, W) of the cached tokens, None without tokens."""
        return tuple(self._h5["tokens"].shape[1:]) if self.has_tokens else None

    def read_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of the given rows (any order, repeats allowed) as float32 [len(rows), E]."""
        data = self._embeddings if self._embeddings is not None else self._h5["embeddings"]
        return _gather(data, rows).astype(np.float32, copy=False)

    def load_embeddings(self) -> np.ndarray:
        """Every embedding as float32 [N, E], converted chunk by chunk."""
        if self._embeddings is not None:
            return self._embeddings.astype(np.float32)
        ds = self._h5["embeddings"]
        out = np.empty(ds.shape, dtype=np.float32)
        step = EMBEDDING_CHUNK_ROWS * 64
        for start in range(0, ds.shape[0], step):
            out[start : start + step] = ds[start : start + step]
        return out

    def read_tokens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of the given rows in their stored dtype (float16 by default): [len(rows), T, W]."""
        if not self.has_tokens:
            raise PixelrecError(f"{self.path} has no tokens; encode with --split-block K for the partial tower")
        if self._tokens is not None:
            return _gather(self._tokens, rows)
        if self._token_map is not None:
            return self._token_map.gather(rows)
        return _gather(self._h5["tokens"], rows)

    @cached_property
    def _token_map(self) -> Optional["_MappedRows"]:
        """The tokens read through a memory map of the file (None where HDF5 stores them filtered)."""
        return _MappedRows.of(self.path, self._h5["tokens"]) if self.has_tokens else None

    def top_blocks_state(self) -> dict[str, torch.Tensor]:
        """The stored float32 weights of the last K blocks and the pooling head."""
        if "top_blocks" not in self._h5:
            raise PixelrecError(f"{self.path} has no top-block weights; encode with --split-block K")
        group, state = self._h5["top_blocks"], {}
        for key in group:  # plain numeric datasets only (0-d too: BatchNorm counts); HDF5 never unpickles
            value = np.asarray(group[key][()]) if isinstance(group[key], h5py.Dataset) else None
            if value is None or value.dtype.kind not in "fiub":
                raise PixelrecError(f"{self.path}: top-block weight {key!r} is not a numeric array; the cache is "
                                    f"damaged, rebuild it with pixelrec encode --overwrite")
            state[key] = torch.from_numpy(value)
        return state

    def top_blocks(self) -> TopBlocks | StageTop:
        """The exact top blocks + head that turned the cached tokens into the cached embeddings: a
        `TopBlocks` (ViT; caches without a `family` attribute are ViT caches) or a `families.StageTop`."""
        state = self.top_blocks_state()
        g = {key: _native(value) for key, value in self._h5["top_blocks"].attrs.items()}
        config, k, pooling = str(g["model_config"]), int(g["k"]), str(g["pooling"])
        family = str(g.get("family", "vit"))
        try:
            if family == "vit":
                return TopBlocks.from_state(config, k, pooling, state)
            return StageTop.from_state(config, k, pooling, state, g)
        except PixelrecError as exc:
            raise PixelrecError(f"{self.path}: {exc}") from None

    # -- compatibility --

    def identity(self) -> dict[str, Any]:
        """The encoder settings and weight fingerprint that produced this cache (IDENTITY_ATTRS)."""
        have = dict(self.attrs, dim=self.dim, split_block=self.split_block or 0)
        return {k: have.get(k) for k in IDENTITY_ATTRS}

    def check_identity(self, expected: dict[str, Any], context: str) -> None:
        """Raise PixelrecError naming this cache and the first identity attribute that differs."""
        mine = self.identity()
        for key in IDENTITY_ATTRS:
            if key in expected and expected[key] != mine[key]:
                have, want = f"{mine[key]!r}", f"{expected[key]!r}"
                if key == "model":  # name the tower families too: a ResNet cache never fits a ViT tower
                    have += f" (a {family_label(family_of_model(str(mine[key])))} tower)"
                    want += f" (a {family_label(family_of_model(str(expected[key])))} tower)"
                raise PixelrecError(f"{context}: {self.path} was made with {key} {have}, "
                                    f"but the run was trained on a cache with {key} {want}")

    def check_compatible(
        self,
        model: Optional[str] = None,
        dim: Optional[int] = None,
        split_block: Optional[int] = None,
        pooling: Optional[str] = None,
        pretrained: Optional[str] = None,
    ) -> None:
        """Raise PixelrecError naming this cache and the first attribute that differs from what is expected."""
        want: dict[str, Any] = {}
        if model is not None:
            want["model"] = model
        if dim is not None:
            want["dim"] = int(dim)
        if pooling is not None:
            want["pooling"] = pooling
        if pretrained is not None:
            want["pretrained"] = pretrained
        if split_block is not None:
            want["split_block"] = int(split_block)
        have = dict(self.attrs, dim=self.dim, split_block=self.split_block or 0)
        problem = settings_mismatch(self.path, have, want, verb="expects")
        if problem:
            raise PixelrecError(problem)


def open_cache(path: str | os.PathLike, in_memory: bool = False) -> EmbeddingCache:
    """Open a complete cache for reading; refuses missing, unfinished, foreign or damaged files by name.

    The damage check is cheap (counts of the header, datasets and blocks, and the last block's
    checksum); `verify_cache` checks every block.
    """
    path = Path(path)
    incomplete = f"{path} is incomplete: rerun the same encode command to resume"
    if path.name.endswith(PARTIAL_SUFFIX):
        raise PixelrecError(incomplete)
    if not path.exists():
        if partial_path(path).exists():
            raise PixelrecError(incomplete)
        raise PixelrecError(f"{path}: embedding cache not found (create it with pixelrec encode)")
    attrs = read_cache_attrs(path)
    if not attrs.get("complete", False):
        raise PixelrecError(incomplete)
    cache = EmbeddingCache(path, in_memory=in_memory)
    try:
        problem = _quick_problem(cache._h5)
    except (OSError, RuntimeError) as exc:
        problem = f"cannot be read ({_failure(exc)[1]})"
    if problem:
        cache.close()
        raise PixelrecError(f"{path} is damaged: {problem}; rebuild it with the same pixelrec encode command "
                            f"and --overwrite")
    return cache


@dataclass
class CacheVerification:
    """What `verify_cache` found in one cache file (complete, or an unfinished `<out>.partial`)."""

    path: str
    format_version: int
    complete: bool  # False for an unfinished cache (only its committed blocks are checked)
    n_rows: int  # committed encoded rows
    n_failed: int  # committed failed items
    n_blocks: int  # committed blocks (batches) recorded; 0 for format 1
    checksums: bool  # block checksums were recorded (format 2+); False: only the counts could be checked
    blocks_verified: int  # blocks whose content was re-read and matched its checksum
    problems: list[str] = field(default_factory=list)  # one sentence each; empty when sound
    bad_blocks: list[int] = field(default_factory=list)  # indices of the blocks that do not match
    first_bad_block: Optional[int] = None  # the first of them
    first_bad_rows: Optional[tuple[int, int]] = None  # its rows [start, stop)
    first_bad_items: list[str] = field(default_factory=list)  # up to 3 item ids stored in those rows

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def summary(self) -> str:
        """One line for the command line."""
        counts = f"{self.n_rows} rows, {self.n_failed} failed items"
        state = "" if self.complete else " (unfinished)"
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            items = f", items {', '.join(self.first_bad_items)}" if self.first_bad_items else ""
            fix = ("rebuild it with the same pixelrec encode command and --overwrite" if self.complete else
                   "rerun the same pixelrec encode command: it encodes the damaged blocks again")
            return f"{self.path}{state} is damaged: {self.problems[0]}{items}{more}; {fix}"
        if not self.checksums:
            return (f"{self.path}{state}: counts consistent ({counts}); no checksums were recorded "
                    f"(format {self.format_version}, written before pixelrec kept them), so the content "
                    f"itself cannot be verified")
        return f"{self.path}{state}: OK, {counts} in {self.n_blocks} blocks, every checksum matches"


def verify_cache(path: str | os.PathLike) -> CacheVerification:
    """Re-read a cache file and check it completely: the header's counts against the dataset
    lengths and the block records, then every block's content against its checksum.

    Works on a complete cache or an unfinished `<out>.partial` (whose committed blocks are checked).
    A damaged cache gives a report with `ok` False, its problems and the first bad block's rows and
    item ids; a missing, unreadable or foreign file raises PixelrecError. Caches of format 1 have
    no checksums: the report then has `checksums` False and only the counts are checked.
    """
    path = Path(path)
    if not path.exists():
        raise PixelrecError(f"{path}: embedding cache not found")
    read_cache_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            return _verify_open_file(f, path)
    except (OSError, RuntimeError) as exc:
        raise PixelrecError(f"{path}: cannot be read to verify it ({_failure(exc)[1]})") from None


def _verify_open_file(f: h5py.File, path: Path) -> CacheVerification:
    attrs = f.attrs
    missing = [name for name in ("item_ids", "embeddings", "failed_item_ids", "failed_reasons") if name not in f]
    if missing:
        raise PixelrecError(f"{path}: not a pixelrec embedding cache (no {', '.join(missing)})")
    version = int(attrs["format_version"])
    complete = bool(attrs.get("complete", False))
    checksums = version >= 2 and "blocks" in f
    blocks = _committed_blocks(f) if checksums else np.empty(0, dtype=BLOCK_DTYPE)
    report = CacheVerification(
        path=str(path),
        format_version=version,
        complete=complete,
        n_rows=int(attrs.get("n_rows", 0)),
        n_failed=int(attrs.get("n_failed", 0)),
        n_blocks=len(blocks),
        checksums=checksums,
        blocks_verified=0,
        problems=_count_problems(f, committed_only=not complete),
    )
    if version >= 2 and not checksums:
        report.problems.append("the block records are missing")
    bad = list(_bad_blocks(f, blocks))
    report.blocks_verified = len(blocks) - len(bad)
    report.problems[:0] = [block.reason for block in bad]  # the first damaged rows come first
    report.bad_blocks = [block.index for block in bad]
    if bad:
        report.first_bad_block, report.first_bad_rows = bad[0].index, bad[0].rows
        with contextlib.suppress(OSError, RuntimeError):
            start, stop = bad[0].rows
            report.first_bad_items = list(f["item_ids"].asstr()[start : min(stop, start + 3)])
    return report


def cache_identity(path: str | os.PathLike) -> dict[str, Any]:
    """`EmbeddingCache.identity()` of the complete cache at `path`."""
    with open_cache(path) as cache:
        return cache.identity()
