"""Reading the embedding cache: `open_cache` checks and opens a complete cache as an `EmbeddingCache`,
which reads rows on demand (see `cache.py`).
"""

from __future__ import annotations

import json
import mmap
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Optional

import h5py
import numpy as np
import torch

from ..errors import PixelrecError
from .encoder import TopBlocks
from .families import StageTop, family_label, family_of_model
from .cache_format import (EMBEDDING_CHUNK_ROWS, IDENTITY_ATTRS, PARTIAL_SUFFIX, _failure, _native, _quick_problem,
    partial_path, read_cache_attrs, settings_mismatch)


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
        self.has_hidden = "hidden" in f
        self.hidden_kind: str = str(self.attrs.get("hidden") or "")  # "cls" | "cls+mean" | "" (none)
        self.hidden_taps: list[int] = json.loads(self.attrs.get("hidden_taps") or "[]")
        self.hidden_widths: list[int] = json.loads(self.attrs.get("hidden_widths") or "[]")  # per tap, unpadded

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
        state.pop("_hidden_map", None)
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

    @property
    def hidden_shape(self) -> Optional[tuple[int, int]]:
        """(taps, W) of the cached per-layer states, None without them."""
        return tuple(self._h5["hidden"].shape[1:]) if self.has_hidden else None

    def require_hidden(self, what: str) -> None:
        """PixelrecError naming this cache and the encode command that makes one with per-layer states."""
        if not self.has_hidden:
            raise PixelrecError(f"{what} reads per-layer states, which {self.path} does not hold; make a cache "
                                f"with them: {hidden_encode_command(self.attrs)}")

    def read_hidden(self, rows: np.ndarray) -> np.ndarray:
        """Per-layer states of the given rows in their stored dtype: [len(rows), taps, W]."""
        self.require_hidden("reading per-layer states")
        if self._hidden_map is not None:
            return self._hidden_map.gather(rows)
        return _gather(self._h5["hidden"], rows)

    @cached_property
    def _hidden_map(self) -> Optional["_MappedRows"]:
        """The per-layer states read through a memory map, as the tokens are (None where filtered)."""
        return _MappedRows.of(self.path, self._h5["hidden"]) if self.has_hidden else None

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


def hidden_encode_command(attrs: dict[str, Any], hidden: str = "", taps: str = "all") -> str:
    """The `pixelrec encode` command that makes a cache like the one with `attrs`, with per-layer
    states (`hidden`: the kind; default the cache's own, else cls)."""
    parts = ["pixelrec encode", f"--images {attrs.get('images') or 'COVERS'}", "--out CACHE.h5",
             f"--encoder {attrs.get('model', 'MODEL')}"]
    if str(attrs.get("pretrained", "none")) != "none":
        parts.append(f"--pretrained {attrs['pretrained']}")
    for key, flag, default in (("pooling", "--pooling", "model"), ("preset", "--preset", "default")):
        if str(attrs.get(key, default)) != default:
            parts.append(f"{flag} {attrs[key]}")
    if attrs.get("image_size"):
        parts.append(f"--image-size {attrs['image_size']}")
    if attrs.get("split_block"):
        parts.append(f"--split-block {attrs['split_block']}")
    parts.append(f"--hidden {hidden or attrs.get('hidden') or 'cls'} --taps {taps}")
    return " ".join(parts)


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




def cache_identity(path: str | os.PathLike) -> dict[str, Any]:
    """`EmbeddingCache.identity()` of the complete cache at `path`."""
    with open_cache(path) as cache:
        return cache.identity()
