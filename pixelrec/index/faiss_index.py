"""FAISS item index: top-k retrieval over the recommender's item vectors, on CPU or GPU.

`ItemIndex` wraps any FAISS index-factory spec ("Flat", "IVF1024,Flat", "IVF1024,PQ16", "HNSW32",
"OPQ16,IVF1024,PQ16", "SQ8", ...) built for inner-product scoring (or cosine: vectors and queries
L2-normalised, then inner product). Results are item vocabulary ids (int64, never 0; -1 marks
padding), kept through `faiss.IndexIDMap`.

An exact (Flat) index on the CPU or one GPU is searched by `ExactSearch` (pixelrec/index/exact.py):
candidates from whichever exhaustive scan is fastest for the batch (FAISS's for 1-3 and from 2,048
queries, torch matrix products otherwise), then scores computed in one canonical way and a
certificate that nothing left out ranks higher, so a query's ids and scores do not depend on the
batch it came in. FAISS also holds the index (files, additions), searches every approximate index,
and a Flat index spread over several GPUs (`search_with_faiss`). How a spec becomes a trained FAISS
index on a device is `faiss_factory.py`; the directory an index is saved to is `index_files.py`.

Conventions shared by `ItemIndex.search` and the torch reference `brute_force_search`:

- each user's excluded ids (their history) never appear in the results;
- rows are sorted by score (descending); equal scores are ordered by the **smaller item id first**,
  so for the exact (Flat) index both give identical lists, ties included, whenever the two score
  computations agree bit for bit (a BLAS can round a product of 1-3 rows differently from one of
  more rows; that can only swap items whose scores agree to ~1e-7 relative);
- rows with fewer than k eligible items (tiny catalogue, long history) end with id -1, score -inf.

The exact search sets the excluded ids' scores to -inf. FAISS's search excludes exactly too: a
user with h excluded ids is searched for k + h' + 1 candidates
(h' = h rounded up to a power of two, so users are grouped into few over-fetch sizes), the
excluded ids are dropped and the first k kept; at most h candidates can be dropped, so k remain.
The one spare candidate shows whether the k-th score is tied with items that were not fetched;
only then (exact index) is the row searched again, twice as wide, to order the tie by id.

A spec may start with "IP2L2," (e.g. "IP2L2,IVF1024,PQ65x4fs,RFlat"): the inner-product search is
then run as an L2 nearest-neighbour search. Each item vector x gets one extra coordinate
sqrt(R^2 - |x|^2), R the largest item norm, and each query a 0, so the L2 distance between them is
|q|^2 + R^2 - 2 q.x and the nearest items are exactly the top inner products. IVF k-means and PQ are
made for L2: clustering by direction *and* norm, they need far fewer lists per query for the same
recall when item norms vary, as trained ones do, than inner-product assignment, which favours
long centroids. Results carry the exact inner products (re-scored from the stored vectors), as
with any other index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch

from ..errors import PixelrecError
from ..runtime import progress, resolve_device
from .exact import ExactSearch
from .faiss_factory import (IP_TO_L2, apply_search_params, default_search_params, exact_device,
                            faiss_rows, for_metric, new_faiss_index, place_index, read_search_params,
                            squared_norms, train_index, with_extra_coordinate)
from .index_files import read_index_files, write_index_files

METRICS = ("ip", "cosine")
GPU_MAX_K = 2048  # largest k FAISS GPU indexes can return; larger over-fetches search a CPU copy
_CHUNK_ENTRIES = 1 << 22  # queries x candidates handled per FAISS call (bounds result memory)
_RESCORE_ENTRIES = 1 << 18  # candidates re-scored per numpy step (bounds the gathered vectors)


class ItemIndex:
    """Item vectors in a FAISS index, plus the raw vectors and ids as numpy arrays.

    Create with `ItemIndex.build` or `ItemIndex.load`. The raw (un-normalised) vectors are kept so
    the index can be rebuilt with another spec (`ItemIndex.build(ix.vectors, ix.ids, spec=...)`)
    and checked against `brute_force_search`.
    """

    def __init__(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, *, spec: str, metric: str,
                 device: str = "cpu", gpu_layout: str = "shard", radius: float | None = None):
        """Wrap a trained CPU `faiss.IndexIDMap` holding `vectors` under `ids` (use build/load);
        `radius`: R of an "IP2L2," index (the FAISS index then holds `faiss_rows` of the vectors)."""
        self._spec = spec
        self._metric = metric
        self._radius = radius
        self._vectors = vectors
        self._ids = ids
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._is_exact = isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
        self._params = read_search_params(index)
        on_device = exact_device(device, gpu_layout) if self._is_exact else None
        if on_device is None:
            self._index, self._device, self._gpu_resources = place_index(index, device, spec, gpu_layout)
        else:  # FAISS keeps the CPU index (files, adds); searches run in torch on on_device
            self._index, self._device, self._gpu_resources = index, str(on_device), None
        self._faiss_on_gpu = self._index is not index
        self._exact = self._exact_search() if on_device is not None else None
        self._cpu_copy: faiss.Index | None = None

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, spec: str = "Flat", metric: str = "ip",
              nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu",
              gpu_layout: str = "shard") -> "ItemIndex":
        """Index `vectors` [N, d] under vocabulary `ids` [N] (int64, unique, >= 1).

        `spec` is any FAISS index-factory string; a bare "IVF<n>" means "IVF<n>,Flat". Indexes that
        need training are trained on `vectors`. `nprobe` (IVF) and `ef_search` (HNSW) set the search
        breadth; when left None, nprobe = min(nlist, 16) and efSearch = 64 (see DEFAULT_NPROBE).
        `device`: "cpu", "cuda[:N]" (needs faiss-gpu: pixelrec[gpu]) or "auto" (GPU when usable);
        "cuda" without N on a machine with several GPUs spreads the index over all of them,
        `gpu_layout` "shard" (each GPU holds a part) or "replicate" (each holds all of it).
        """
        _check_metric(metric)
        vectors, ids = _check_items(vectors, ids)
        if len(ids) == 0:
            raise PixelrecError("no item vectors to index")
        index, spec = new_faiss_index(spec, vectors.shape[1])
        data, radius = faiss_rows(vectors, metric, spec)
        train_index(index, data, spec)
        index = faiss.IndexIDMap(index)
        index.add_with_ids(data, ids)
        nprobe, ef_search = default_search_params(index, nprobe, ef_search)
        apply_search_params(index, spec, nprobe, ef_search)
        return cls(index, vectors, ids, spec=spec, metric=metric, device=device, gpu_layout=gpu_layout,
                   radius=radius)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> "ItemIndex":
        """Load an index saved by `save`; any missing, corrupt or inconsistent file is a PixelrecError."""
        index, vectors, ids, meta, radius = read_index_files(Path(directory))
        _check_metric(meta["metric"])
        apply_search_params(index, meta["spec"], meta.get("nprobe"), meta.get("ef_search"))
        return cls(index, vectors, ids, spec=meta["spec"], metric=meta["metric"], device=device, radius=radius)

    # ----------------------------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Item vector dimension (an "IP2L2," FAISS index holds one more coordinate)."""
        return int(self._vectors.shape[1])

    @property
    def spec(self) -> str:
        """FAISS index-factory string the index was built from."""
        return self._spec

    @property
    def metric(self) -> str:
        """"ip" (inner product) or "cosine"."""
        return self._metric

    @property
    def device(self) -> str:
        """Where searches run: "cpu" or "cuda:N"."""
        return self._device

    @property
    def is_exact(self) -> bool:
        """True for a Flat index (exhaustive search, same results as `brute_force_search`)."""
        return self._is_exact

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for non-IVF indexes)."""
        return self._params["nprobe"]

    @property
    def ef_search(self) -> int | None:
        """HNSW search breadth (None for non-HNSW indexes)."""
        return self._params["ef_search"]

    @property
    def vectors(self) -> np.ndarray:
        """The raw item vectors [N, d] as given (not normalised), in insertion order."""
        return self._vectors

    @property
    def ids(self) -> np.ndarray:
        """Item ids [N] in insertion order (row i of `vectors` is item `ids[i]`)."""
        return self._ids

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"ItemIndex({self.describe()})"

    def describe(self) -> str:
        """One line: spec, exactness, metric, size, search parameters and device."""
        kind = "exact" if self.is_exact else "approximate"
        metric = "inner product" if self.metric == "ip" else "cosine"
        params = "".join(f", {name}={value}" for name, value in self._params.items() if value is not None)
        return f"{self.spec} ({kind}, {metric}), {self.ntotal} items, d={self.dim}{params}, {self.device}"

    # ----------------------------------------------------------------------------- changes
    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change nprobe (IVF) and/or efSearch (HNSW) without rebuilding; None leaves a value as is."""
        apply_search_params(self._index, self.spec, nprobe, ef_search, gpu=self._faiss_on_gpu)
        self._params.update({k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None})
        self._cpu_copy = None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add new items (e.g. cold items encoded later) under new ids; existing ids are never reused.

        Trained indexes (IVF, PQ) encode them with their existing quantizers; nothing is retrained.
        An "IP2L2," index takes only vectors no longer than its longest one (else a PixelrecError).
        """
        vectors, ids = _check_items(vectors, ids, dim=self.dim)
        taken = np.intersect1d(ids, self._ids)
        if len(taken):
            raise PixelrecError(f"item id(s) already in the index: {_preview(taken)}; new items need new ids")
        if self._radius is not None:
            longer = squared_norms(for_metric(vectors, self.metric)) > self._radius ** 2 * (1 + 1e-6)
            if longer.any():
                raise PixelrecError(
                    f"item id(s) {_preview(ids[longer])} are longer than the largest vector of this "
                    f"{IP_TO_L2} index ({self._radius:.6g}), so its L2 search could not rank them right; "
                    f"build the index again over all vectors (`pixelrec index RUN_DIR` does)")
        data, _ = faiss_rows(vectors, self.metric, self.spec, self._radius)
        self._index.add_with_ids(data, ids)
        self._vectors = np.concatenate([self._vectors, vectors])
        self._ids = np.concatenate([self._ids, ids])
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._cpu_copy = None
        if self._exact is not None:
            self._exact = self._exact_search()

    # ----------------------------------------------------------------------------- queries
    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for each query vector: (scores [U, k] float32, ids [U, k] int64).

        `exclude[u]` lists item ids user u must not get (their history; ids not in the index are
        harmless). See the module docstring for the ordering, tie and padding conventions; an
        approximate index can also pad a row when its nprobe / efSearch reaches too few items.
        An exact (Flat) index on one device searches with `ExactSearch` (pixelrec/index/exact.py):
        canonical scores, so results do not depend on the batch; other indexes (and Flat over several
        GPUs) with FAISS, see `search_with_faiss`. Queries are processed in
        chunks, so memory stays bounded.
        """
        if self._exact is None:
            return self.search_with_faiss(queries, k, exclude)
        queries = _prepare_queries(queries, self.dim, self.metric)
        _check_k(k, self.ntotal)
        excluded = _exclusion_lists(exclude, len(queries))
        step = max(1, _CHUNK_ENTRIES // k)
        if len(queries) <= step:  # one chunk (serve's micro-batches, retrieve): no progress bar to draw
            return self._exact.search(queries, k, excluded)
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        with progress(total=len(queries), desc="search", unit="user") as bar:
            for start in range(0, len(queries), step):
                part = slice(start, start + step)
                scores[part], ids[part] = self._exact.search(queries[part], k, excluded[part])
                bar.update(len(scores[part]))
        return scores, ids

    def search_with_faiss(self, queries: np.ndarray, k: int,
                          exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`search` through the FAISS index itself, whatever its kind: approximate indexes always
        search this way; for a Flat index it is the path before `ExactSearch`, kept to compare
        with (`benchmarks/retrieval.py --exact`). Users are grouped by over-fetch size (see the
        module docstring); a Flat index's results may then differ in the last bit between batch
        sizes (FAISS uses BLAS only from 2,000 queries at d 64)."""
        queries = _prepare_queries(queries, self.dim, self.metric)
        _check_k(k, self.ntotal)
        excluded = _exclusion_lists(exclude, len(queries))
        fetch = _fetch_sizes(excluded, k, self.ntotal)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        # delay: a bar only for a search that lasts (not for serve's or retrieve's few queries)
        with progress(total=len(queries), desc="search", unit="user", delay=0.5) as bar:
            for size in np.unique(fetch):
                rows = np.flatnonzero(fetch == size)
                step = max(1, _CHUNK_ENTRIES // int(size))
                for start in range(0, len(rows), step):
                    chunk = rows[start:start + step]
                    scores[chunk], ids[chunk] = self._search_rows(
                        queries[chunk], [excluded[u] for u in chunk], k, int(size))
                    bar.update(len(chunk))
        return scores, ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Raw vectors [len(ids), d] of the given item ids (unknown ids are a PixelrecError)."""
        ids = np.asarray(ids, dtype=np.int64)
        positions, found = _positions(self._sorted_ids, ids)
        if not found.all():
            raise PixelrecError(f"item id(s) not in the index: {_preview(ids[~found])}")
        return np.asarray(self._vectors[self._order[positions]])

    def serialized_size(self) -> int:
        """Bytes of the serialized FAISS index (the size of index.faiss)."""
        return int(faiss.serialize_index(self._cpu_index()).nbytes)

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write index.faiss (CPU form), item_vectors.npy, item_ids.npy, then index.json, each atomically."""
        write_index_files(Path(directory), self._cpu_index(), np.asarray(self._vectors), self._ids, {
            "spec": self.spec, "metric": self.metric, "dim": self.dim, "ntotal": self.ntotal,
            "nprobe": self.nprobe, "ef_search": self.ef_search, "exact": self.is_exact,
            **({} if self._radius is None else {"ip2l2_radius": self._radius}),
        })

    # ----------------------------------------------------------------------------- internals
    def _search_rows(self, queries: np.ndarray, excluded: list[np.ndarray], k: int,
                     fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Search `fetch` candidates, drop excluded ids, keep k; widen the fetch on ties at the cut."""
        scores, ids = self._faiss_search(queries, fetch)
        top_scores, top_ids, cut_tie = _select(scores, ids, excluded, k)
        redo = np.flatnonzero(cut_tie) if self.is_exact and fetch < self.ntotal else []
        if len(redo):
            top_scores[redo], top_ids[redo] = self._search_rows(
                queries[redo], [excluded[r] for r in redo], k, min(self.ntotal, 2 * fetch))
        return top_scores, top_ids

    def _faiss_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [B, fetch] of the FAISS index; an "IP2L2," index's distances are replaced by
        the exact inner products, so its rows are ranked like every other index's."""
        data = queries if self._radius is None else with_extra_coordinate(queries, np.zeros(len(queries)))
        index = self._index
        if self._faiss_on_gpu and fetch > GPU_MAX_K:
            if self._cpu_copy is None:
                self._cpu_copy = self._cpu_index()
            index = self._cpu_copy
        scores, ids = index.search(data, fetch)
        if self._radius is not None:
            scores = self._exact_scores(queries, ids)
        return scores, ids

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[B, F] inner products of queries [B, d] (as searched) with the stored vectors of ids [B, F]
        (-inf where the id is -1 padding)."""
        positions, found = _positions(self._sorted_ids, np.maximum(ids, 0))
        found &= ids >= 0
        rows = self._order[positions]
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        step = max(1, _RESCORE_ENTRIES // max(1, ids.shape[1]))
        for start in range(0, len(ids), step):
            part = slice(start, start + step)
            items = for_metric(np.asarray(self._vectors[rows[part].ravel()], dtype=np.float32), self.metric)
            scores[part] = np.einsum("bd,bfd->bf", queries[part], items.reshape(*rows[part].shape, -1))
        scores[~found] = -np.inf
        return scores

    def _cpu_index(self) -> faiss.Index:
        return faiss.index_gpu_to_cpu(self._index) if self._faiss_on_gpu else self._index

    def _exact_search(self) -> ExactSearch:
        """The exact search over the current vectors (as searched: normalised for cosine); on the CPU
        it takes its candidates for the batch sizes FAISS scans fastest from this index's own Flat."""
        flat = faiss.downcast_index(self._index.index)
        scan = None
        if self._radius is None and not self._faiss_on_gpu and flat.metric_type == faiss.METRIC_INNER_PRODUCT:
            scan = self._index.search
        return ExactSearch(for_metric(np.asarray(self._vectors, dtype=np.float32), self.metric), self._ids,
                           torch.device(self._device), faiss_search=scan)


def brute_force_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                       exclude: Sequence[np.ndarray] | None = None, metric: str = "ip", device: str = "cpu",
                       batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The PixelRec-style reference: torch matmul of each query batch with all items, excluded ids set
    to -inf, a full stable sort, the first k kept. Same outputs and conventions as `ItemIndex.search`.
    """
    _check_metric(metric)
    vectors, ids = _check_items(vectors, ids)
    order = np.argsort(ids, kind="stable")  # sort by id so a stable sort breaks ties by smaller id
    ids = ids[order]
    items = torch.from_numpy(for_metric(vectors[order], metric)).to(resolve_device(device))
    queries = _prepare_queries(queries, vectors.shape[1], metric)
    _check_k(k, len(ids))
    excluded = _exclusion_lists(exclude, len(queries))
    batch = batch_size or max(1, (_CHUNK_ENTRIES * 4) // len(ids))
    scores = np.empty((len(queries), k), dtype=np.float32)
    top_ids = np.empty((len(queries), k), dtype=np.int64)
    for start in progress(range(0, len(queries), batch), desc="brute force", unit="batch"):
        stop = min(start + batch, len(queries))
        batch_scores = torch.from_numpy(queries[start:stop]).to(items.device) @ items.T
        rows, cols = _exclusion_pairs(excluded[start:stop], ids)
        batch_scores[torch.from_numpy(rows).to(items.device), torch.from_numpy(cols).to(items.device)] = -torch.inf
        values, positions = torch.sort(batch_scores, dim=1, descending=True, stable=True)
        scores[start:stop] = values[:, :k].cpu().numpy()
        top_ids[start:stop] = ids[positions[:, :k].cpu().numpy()]
    top_ids[np.isneginf(scores)] = -1
    return scores, top_ids


# --------------------------------------------------------------------------------- validation
def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise PixelrecError(f"unknown index metric {metric!r}; expected one of {', '.join(METRICS)}")


def _check_items(vectors: np.ndarray, ids: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (float32 C-contiguous vectors [N, d], int64 ids [N])."""
    vectors = np.asarray(vectors)
    ids = np.asarray(ids)
    if vectors.ndim != 2 or ids.ndim != 1 or len(vectors) != len(ids):
        raise PixelrecError(f"expected item vectors [N, d] and ids [N], got {vectors.shape} and {ids.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise PixelrecError(
            f"item vectors have dimension {vectors.shape[1]} but the index holds {dim}-dimensional vectors")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise PixelrecError(f"item ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if (ids < 1).any():
        raise PixelrecError(f"item ids must be >= 1 (0 is padding), got {_preview(ids[ids < 1])}")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise PixelrecError(f"duplicate item id(s): {_preview(unique[counts > 1])}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise PixelrecError(f"item vector(s) with NaN or inf for item id(s) {_preview(ids[bad])}")
    return vectors, ids


def _prepare_queries(queries: np.ndarray, dim: int, metric: str) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise PixelrecError(f"expected query vectors [U, d], got shape {queries.shape}")
    if queries.shape[1] != dim:
        raise PixelrecError(
            f"query vectors have dimension {queries.shape[1]} but the item vectors have dimension {dim}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
    if len(bad):
        raise PixelrecError(f"query vector(s) with NaN or inf at row(s) {_preview(bad)}")
    return for_metric(queries, metric)


def _check_k(k: int, ntotal: int) -> None:
    if int(k) != k or k < 1:
        raise PixelrecError(f"k must be a positive integer, got {k}")
    if k > ntotal:
        raise PixelrecError(f"k={k} but the index holds only {ntotal} items")



def _preview(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in np.asarray(values)[:limit])
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")


# --------------------------------------------------------------------------------- search helpers
def _exclusion_lists(exclude: Sequence[np.ndarray] | None, users: int) -> list[np.ndarray]:
    """One int64 array of excluded ids per user (negative ids can never match and are dropped)."""
    if exclude is None:
        return [np.empty(0, dtype=np.int64)] * users
    if len(exclude) != users:
        raise PixelrecError(f"{len(exclude)} exclusion lists for {users} query vectors")
    lists = [np.asarray(e, dtype=np.int64).ravel() for e in exclude]
    return [e[e >= 0] if len(e) and e.min() < 0 else e for e in lists]


def _fetch_sizes(excluded: list[np.ndarray], k: int, ntotal: int) -> np.ndarray:
    """Candidates to fetch per user: k + history length rounded up to a power of two + 1 spare (<= ntotal)."""
    lengths = np.array([len(e) for e in excluded], dtype=np.int64)
    rounded = np.where(lengths > 0, 2 ** np.ceil(np.log2(np.maximum(lengths, 1))), 0).astype(np.int64)
    return np.minimum(k + rounded + 1, ntotal)


def _excluded_mask(candidates: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """[B, F] bool: candidate ids[b, f] is in excluded[b] (one sorted array of (row, id) keys)."""
    lengths = [len(e) for e in excluded]
    if sum(lengths) == 0:
        return np.zeros(candidates.shape, dtype=bool)
    flat = np.concatenate(excluded)
    span = int(max(candidates.max(), flat.max())) + 2
    keys = np.sort(np.repeat(np.arange(len(excluded), dtype=np.int64), lengths) * span + flat + 1)
    wanted = np.arange(len(candidates), dtype=np.int64)[:, None] * span + candidates + 1
    return keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] == wanted


def _select(scores: np.ndarray, ids: np.ndarray, excluded: list[np.ndarray],
            k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop excluded/missing candidates, order by (score desc, id asc), keep k; padded with -1/-inf.

    Also returns, per row, whether the k-th kept score equals the lowest fetched score: then items
    that were not fetched may tie with it and a wider fetch is needed to pick the smaller ids.
    """
    invalid = (ids < 0) | _excluded_mask(ids, excluded)
    order = np.lexsort((ids, -scores, invalid), axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_invalid = np.take_along_axis(invalid, order, axis=1)
    top_scores[top_invalid] = -np.inf
    top_ids[top_invalid] = -1
    cut_tie = ~top_invalid[:, -1] & (ids[:, -1] >= 0) & (top_scores[:, -1] == scores[:, -1])
    return top_scores, top_ids, cut_tie


def _exclusion_pairs(excluded: list[np.ndarray], sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) positions of the excluded ids that exist in `sorted_ids`."""
    lengths = [len(e) for e in excluded]
    if sum(lengths) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(excluded), dtype=np.int64), lengths)
    positions, found = _positions(sorted_ids, np.concatenate(excluded))
    return rows[found], positions[found]


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `ids` in `sorted_ids` and whether each was found."""
    positions = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return positions, sorted_ids[positions] == ids


