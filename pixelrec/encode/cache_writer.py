"""Writing the embedding cache: `CacheWriter` appends checksummed blocks to `<out>.partial`, resumes
an interrupted one and publishes it (see `cache.py` for the layout and the guarantees).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from ..errors import PixelrecError
from ..runtime import fsync_path, log
from .encoder import TopBlocks
from .cache_format import (BLOCK_CHUNK_ROWS, BLOCK_DTYPE, CHECKSUM, EMBEDDING_CHUNK_ROWS, FORMAT_VERSION,
    STRING_CHUNK_ROWS, TOKEN_CHUNK_BYTES, UnusablePartial, _ABANDONED, _SPACE_ERRNOS, _STR, _close_quietly,
    _committed_blocks, _count_problems, _failure, _file_key, _first_bad_block, _native, _open_for_writing,
    _refuse_abandoned, _write_error, _write_errors, block_checksum, partial_path)


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
    hidden_shape: Optional[tuple[int, int]] = None,
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
    if hidden_shape is not None:
        t, w = hidden_shape
        rows = int(min(64, max(1, TOKEN_CHUNK_BYTES // (t * w * np.dtype(embedding_dtype).itemsize))))
        f.create_dataset("hidden", (0, t, w), maxshape=(None, t, w), dtype=embedding_dtype, chunks=(rows, t, w))
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
    for name, length in (("item_ids", n_rows), ("embeddings", n_rows), ("tokens", n_rows), ("hidden", n_rows),
                         ("failed_item_ids", n_failed), ("failed_reasons", n_failed), ("blocks", len(blocks))):
        if name in f and f[name].shape[0] != length:
            f[name].resize(length, axis=0)
    positions_done = int(blocks["end_position"][-1]) if len(blocks) else 0
    f.attrs.update(n_rows=n_rows, n_failed=n_failed, n_blocks=len(blocks), positions_done=positions_done)
    f.flush()


def _write_block(f: h5py.File, item_ids: np.ndarray, embeddings: np.ndarray, tokens: Optional[np.ndarray],
                 failed_ids: np.ndarray, reasons: np.ndarray, record: np.ndarray,
                 hidden: Optional[np.ndarray] = None) -> None:
    """Append one block's rows, failures and record, then commit it in the header and flush."""
    n_rows, n_failed, n_blocks = (int(f.attrs[name]) for name in ("n_rows", "n_failed", "n_blocks"))
    _extend(f["item_ids"], n_rows, item_ids)
    _extend(f["embeddings"], n_rows, embeddings)
    if tokens is not None:
        _extend(f["tokens"], n_rows, tokens)
    if hidden is not None:
        _extend(f["hidden"], n_rows, hidden)
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
        hidden_shape = tuple(old["hidden"].shape[1:]) if "hidden" in old else None
        new = _open_for_writing(fresh, "w")
        try:
            _create_layout(new, dict(old.attrs), embeddings.shape[1], embeddings.dtype, token_shape, None, None,
                           hidden_shape)
            if "top_blocks" in old:
                old.copy(old["top_blocks"], new)
            row, failed = 0, 0
            for i in range(len(blocks)):
                rows = slice(row, row + int(blocks["rows"][i]))
                fails = slice(failed, failed + int(blocks["failed"][i]))
                _write_block(new, old["item_ids"].asstr()[rows].astype(object), embeddings[rows],
                             old["tokens"][rows] if token_shape else None,
                             old["failed_item_ids"].asstr()[fails].astype(object),
                             old["failed_reasons"].asstr()[fails].astype(object), blocks[i : i + 1],
                             old["hidden"][rows] if hidden_shape else None)
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
        hidden_shape: Optional[tuple[int, int]] = None,
    ) -> "CacheWriter":
        """Start a fresh `<out>.partial` (replacing any previous one); `hidden_shape` (T, W): it also
        stores per-layer states (`encode --hidden`)."""
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
                _create_layout(f, attrs, dim, embedding_dtype, token_shape, top_blocks, top_state, hidden_shape)
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
        hidden: Optional[np.ndarray] = None,
    ) -> None:
        """Commit one block: its encoded rows (with their tokens and per-layer states where the cache
        stores them), its failures, its checksum and how far through the catalogue we are (every
        position before `positions_done` is either a row or a failure). Nothing of a block whose
        write fails counts as committed."""
        self._require_open()
        f = self._f
        ids = np.asarray(list(item_ids), dtype=object)
        rows = np.ascontiguousarray(embeddings, dtype=f["embeddings"].dtype)  # exactly the bytes stored
        token_rows = None
        if "tokens" in f and len(ids):
            if tokens is None:
                raise ValueError(f"{self.path} stores tokens: append() needs the tokens of its rows")
            token_rows = np.ascontiguousarray(tokens, dtype=f["tokens"].dtype)
        hidden_rows = None
        if "hidden" in f and len(ids):
            if hidden is None:
                raise ValueError(f"{self.path} stores per-layer states: append() needs the states of its rows")
            hidden_rows = np.ascontiguousarray(hidden, dtype=f["hidden"].dtype)
        if len(rows) != len(ids) or any(extra is not None and len(extra) != len(ids)
                                        for extra in (token_rows, hidden_rows)):
            raise ValueError(f"append(): {len(ids)} item ids but {len(rows)} embeddings / "
                             f"{len(ids) if token_rows is None else len(token_rows)} token rows")
        failed_ids = np.asarray([item_id for item_id, _ in failed], dtype=object)
        reasons = np.asarray([reason for _, reason in failed], dtype=object)
        crc = block_checksum(ids, rows, token_rows, failed_ids, reasons, hidden_rows)
        record = np.array([(positions_done, len(ids), len(failed), crc)], dtype=BLOCK_DTYPE)
        with self._writing():
            _write_block(f, ids, rows, token_rows, failed_ids, reasons, record, hidden_rows)

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
