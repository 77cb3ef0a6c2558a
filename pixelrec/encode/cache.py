"""The HDF5 embedding cache (SPEC §5): what `encode` writes and `fit` / `index` read.

Layout of a complete cache file:

    item_ids          [N]          utf-8 strings, the encoded items in catalogue (sorted id) order
    embeddings        [N, E]       float16 (default) or float32, row i belongs to item_ids[i]
    tokens            [N, T, W]    optional, same dtype: activations entering the last `split_block`
                                   blocks (T tokens incl. the class token, width W)
    failed_item_ids   [F]          utf-8 strings: items whose image could not be encoded ...
    failed_reasons    [F]          ... and why ("missing", "zero-byte file", "corrupt ...")
    top_blocks/       group        with tokens: float32 weights of the last K blocks and the pooling
                                   head, one dataset per state_dict key; attrs model_config, k, pooling
    attrs             model, pretrained, image_size, dim, normalized, created, pixelrec_version,
                      pooling, preset, model_config (json), preprocess (json), embedding_dtype,
                      split_block (0 = no tokens), weights_sha256, items_sha256, n_catalogue,
                      positions_done, n_rows, n_failed, format_version, complete

Writing (`CacheWriter`) goes to `<out>.partial`: chunked, resizable datasets, one append and one
flush per batch, with `positions_done` / `n_rows` / `n_failed` recording what is committed, so a
killed process loses at most the batch in flight. `finish()` sets `complete` last and renames
the file onto `<out>`; `open_cache` refuses anything without `complete`, so no file ever looks
complete when it is not.

Reading (`EmbeddingCache`) reads rows on demand by chunks (arbitrary, unsorted, repeated row
arrays) unless `in_memory=True`; a large cache is never loaded whole unless asked.
"""

from __future__ import annotations

import contextlib
import errno
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from ..errors import PixelrecError
from .encoder import TopBlocks

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
EMBEDDING_CHUNK_ROWS = 256
TOKEN_CHUNK_BYTES = 64 * 1024  # aim for ~64 KiB token chunks: 1..16 items each
STRING_CHUNK_ROWS = 1024
_STR = h5py.string_dtype("utf-8")

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


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn filesystem/HDF5 write failures (disk full, quota, I/O error) into a one-line PixelrecError."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc).splitlines()[0]
        if exc.errno == errno.ENOSPC or "No space left" in str(exc):
            reason = "no space left on device"
        raise PixelrecError(
            f"{path}: cannot write the cache: {reason}; free space and rerun the same command to resume"
        ) from None


# ---- writing --------------------------------------------------------------------------------------


class CacheWriter:
    """Appends encoded batches to `<out>.partial` and renames it onto `<out>` when complete."""

    def __init__(self, out: Path, file: h5py.File):
        self.out = out
        self.path = partial_path(out)
        self._f = file

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
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            f = h5py.File(path, "w")
            try:
                f.attrs.update({k: v for k, v in attrs.items()})
                f.attrs.update(format_version=FORMAT_VERSION, positions_done=0, n_rows=0, n_failed=0, complete=False)
                f.create_dataset("item_ids", (0,), maxshape=(None,), dtype=_STR, chunks=(STRING_CHUNK_ROWS,))
                f.create_dataset(
                    "embeddings", (0, dim), maxshape=(None, dim), dtype=embedding_dtype, chunks=(EMBEDDING_CHUNK_ROWS, dim)
                )
                f.create_dataset("failed_item_ids", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
                f.create_dataset("failed_reasons", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
                if token_shape is not None:
                    t, w = token_shape
                    item_bytes = t * w * np.dtype(embedding_dtype).itemsize
                    rows = int(min(16, max(1, TOKEN_CHUNK_BYTES // item_bytes)))
                    f.create_dataset(
                        "tokens", (0, t, w), maxshape=(None, t, w), dtype=embedding_dtype, chunks=(rows, t, w)
                    )
                if top_blocks is not None:
                    group = f.create_group("top_blocks")
                    group.attrs.update(model_config=top_blocks.config_json, k=top_blocks.k, pooling=top_blocks.pooling)
                    for key, value in top_blocks.state_dict().items():
                        group.create_dataset(key, data=value.detach().to("cpu", torch.float32).numpy())
                f.flush()
            except BaseException:
                f.close()
                raise
        return cls(out, f)

    @classmethod
    def resume(cls, out: str | os.PathLike) -> "CacheWriter":
        """Reopen `<out>.partial`, dropping anything written after its last committed batch."""
        out = Path(out)
        path = partial_path(out)
        try:
            f = h5py.File(path, "r+")
        except OSError as exc:
            raise PixelrecError(
                f"{path}: cannot reopen the unfinished cache to resume ({str(exc).splitlines()[0]}); "
                f"use --overwrite to start again"
            ) from None
        writer = cls(out, f)
        with _write_errors(path):
            n_rows, n_failed = writer.n_rows, writer.n_failed
            for name in ("item_ids", "embeddings", "tokens"):
                if name in f and f[name].shape[0] != n_rows:
                    f[name].resize(n_rows, axis=0)
            for name in ("failed_item_ids", "failed_reasons"):
                if f[name].shape[0] != n_failed:
                    f[name].resize(n_failed, axis=0)
            f.flush()
        return writer

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
        """Commit one batch: its encoded rows, its failures, and how far through the catalogue we are."""
        f = self._f
        with _write_errors(self.path):
            n0, n1 = self.n_rows, self.n_rows + len(item_ids)
            if n1 > n0:
                for name, data in (("item_ids", np.asarray(item_ids, dtype=object)), ("embeddings", embeddings),
                                   ("tokens", tokens)):
                    if name in f:
                        f[name].resize(n1, axis=0)
                        f[name][n0:n1] = data
            m0, m1 = self.n_failed, self.n_failed + len(failed)
            if m1 > m0:
                for name, column in (("failed_item_ids", 0), ("failed_reasons", 1)):
                    f[name].resize(m1, axis=0)
                    f[name][m0:m1] = np.asarray([entry[column] for entry in failed], dtype=object)
            f.attrs.update(n_rows=n1, n_failed=m1, positions_done=positions_done)
            f.flush()

    def finish(self) -> Path:
        """Mark the cache complete and move it to its final name; returns that path."""
        with _write_errors(self.path):
            if self.positions_done != int(self._f.attrs["n_catalogue"]):
                raise PixelrecError(f"{self.path}: finish() before every item was processed")
            self._f.attrs["complete"] = True
            self._f.flush()
            self._f.close()
            os.replace(self.path, self.out)
        return self.out

    def close(self) -> None:
        """Close without finishing (the partial file stays for a resume)."""
        if self._f.id.valid:
            with contextlib.suppress(OSError):
                self._f.close()


# ---- reading --------------------------------------------------------------------------------------


def read_cache_attrs(path: str | os.PathLike, advice: str = "") -> dict[str, Any]:
    """Attributes of a pixelrec cache file (complete or partial); PixelrecError for anything else."""
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
        data = self._tokens if self._tokens is not None else self._h5["tokens"]
        return _gather(data, rows)

    def top_blocks_state(self) -> dict[str, torch.Tensor]:
        """The stored float32 weights of the last K blocks and the pooling head."""
        if "top_blocks" not in self._h5:
            raise PixelrecError(f"{self.path} has no top-block weights; encode with --split-block K")
        group = self._h5["top_blocks"]
        return {key: torch.from_numpy(group[key][()]) for key in group}

    def top_blocks(self) -> TopBlocks:
        """The exact top blocks + head that turned the cached tokens into the cached embeddings."""
        state = self.top_blocks_state()
        g = self._h5["top_blocks"].attrs
        return TopBlocks.from_state(str(_native(g["model_config"])), int(g["k"]), str(_native(g["pooling"])), state)

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
                raise PixelrecError(f"{context}: {self.path} was made with {key} {mine[key]!r}, "
                                    f"but the run was trained on a cache with {key} {expected[key]!r}")

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
    """Open a complete cache for reading; refuses missing, unfinished or foreign files by name."""
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
    return EmbeddingCache(path, in_memory=in_memory)


def cache_identity(path: str | os.PathLike) -> dict[str, Any]:
    """`EmbeddingCache.identity()` of the complete cache at `path`."""
    with open_cache(path) as cache:
        return cache.identity()
