"""Exact top-k whose ids and scores do not depend on the batch: fast candidates, canonical scores.

A BLAS product does not round a row's scores the same way for every number of rows (MKL, for one,
takes another kernel below 4 rows and splits rows between threads differently), and FAISS's own
scan rounds differently again, so the fastest way to score a batch depends on its size and its
bits would too. Here the speed and the result are separated:

1. **Candidates**, by whichever exhaustive float32 search is fastest for the batch: FAISS's scan of
   the index (1-3 queries, and from 2,048 queries on, where it blocks queries for BLAS and keeps a
   fused heap) or torch products of the queries with item blocks ([d, width], sorted by id) and a
   running top-k through chunk maxima (every other batch, and every batch on a GPU). Each query
   gets its k + `MARGIN` best items by these approximate scores (excluded ids never among them).
   Batches of 1-3 go through FAISS one query at a time (`_search_one`: the same steps on 1-D
   arrays, so a lone query costs little more than FAISS's scan).
2. **Canonical scores** of the candidates: products of the float32 query and item in float64
   (exact), summed over the dimensions as a fixed pairwise tree, rounded once to float32
   (`canonical_scores`). That is elementwise arithmetic in one fixed order, so a query's score of
   an item is the same bits in every batch, on every path and device. Rows are sorted by it, ties
   by the smaller id.
3. **A certificate** that no item left out could rank higher: any float32 dot product of length d
   is within gamma_d |q| |x| of the exact one (gamma_d = d u / (1 - d u), u = 2^-24), and the
   canonical score within d 2^-53 |q||x| + half an ulp of it. So an item outside the candidates,
   whose approximate score is at most the last candidate's, has a canonical score at most that
   plus `slack` (twice both bounds, with the largest item norm). If the k-th canonical score is
   above it the row is final; else (many items tied around the k-th) it is searched again with 4x
   the candidates, up to every item.

The result equals ranking every item by its canonical score (excluded ids removed, ties by id),
whatever the batch or path: `tests/test_exact_search.py` checks batch sizes 1, 7, 64, 2,000 and
all bit for bit, forced retries, both candidate paths, and the ranking against an independent
float64 reference. Rows with fewer than k eligible items end with id -1, score -inf.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

ITEM_COLUMNS = {"cpu": 8192, "cuda": 1 << 16}  # items per block (at most; fixed per index)
CHUNK = 64  # columns per chunk whose maximum preselects the chunks a top k can lie in
GROUP_ENTRIES = {"cpu": 1 << 20, "cuda": 1 << 28}  # query rows x items scored before selecting
MARGIN = 4  # candidates beyond k per query (a retry takes 4x as many)
FAISS_BELOW, FAISS_FROM = 4, 2048  # CPU batches whose candidates come from FAISS's scan (when given)
CANONICAL_ENTRIES = 1 << 18  # query x candidate pairs rescored at a time (x d float64 values)

# (queries [B, d] float32, n) -> (scores [B, n], item ids [B, n], -1 where none): a FAISS Flat search
FaissSearch = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]


class ExactSearch:
    """Exact inner-product top-k over fixed item vectors, on one torch device."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: torch.device,
                 faiss_search: FaissSearch | None = None):
        """`vectors` [N, d] float32 as searched (already normalised for cosine), `ids` [N] unique;
        `faiss_search`: a FAISS Flat search of the same vectors and ids, for the batch sizes where its
        scan is the faster way to find candidates (CPU only); None = torch products always."""
        self.device = device
        kind = "cuda" if device.type == "cuda" else "cpu"
        count, dim = vectors.shape
        self.width = _block_width(count, ITEM_COLUMNS[kind])
        self.entries = GROUP_ENTRIES[kind]
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = np.asarray(ids)[order]
        self.count, self.dim = count, dim
        blocks = torch.zeros(-(-count // self.width), dim, self.width)
        for b, start in enumerate(range(0, count, self.width)):
            part = order[start:start + self.width]
            blocks[b, :, :len(part)] = torch.from_numpy(np.asarray(vectors[part], dtype=np.float32)).T
        self.items = blocks.to(device)  # [blocks, d, width]
        self._blocks_np = blocks.numpy() if kind == "cpu" else None  # the same memory (canonical scores read it)
        self.faiss_search = faiss_search if kind == "cpu" else None
        self._position = None  # id -> position in id order (-1: none), where the ids are dense enough
        if count and 0 <= self.sorted_ids[0] and self.sorted_ids[-1] < 4 * count + 1024:
            self._position = np.full(int(self.sorted_ids[-1]) + 1, -1, dtype=np.int64)
            self._position[self.sorted_ids] = np.arange(count)
        largest = float(np.sqrt((np.asarray(vectors, dtype=np.float64) ** 2).sum(1).max())) if count else 0.0
        u = 2.0 ** -24
        gamma = dim * u / (1 - dim * u)
        self.slack_per_norm = 2 * (gamma + dim * 2.0 ** -53 + u) * largest  # x |q|: see the module docstring

    def search(self, queries: np.ndarray, k: int,
               excluded: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scores [U, k] float32, ids [U, k] int64) of queries [U, d]; `excluded[u]` int64 ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.faiss_search is not None and 0 < len(queries) < FAISS_BELOW:  # a query at a time
            found = [self._search_one(queries[u:u + 1], k, np.asarray(excluded[u], dtype=np.int64))
                     for u in range(len(queries))]
            return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        users = len(queries)
        scores = np.full((users, k), -np.inf, dtype=np.float32)
        ids = np.full((users, k), -1, dtype=np.int64)
        slack = np.sqrt(np.einsum("ud,ud->u", queries, queries, dtype=np.float64)) * self.slack_per_norm  # [U]
        pending, fetch = np.arange(users), min(self.count, k + MARGIN)
        while len(pending):
            positions, last = self._candidates(queries[pending], [excluded[u] for u in pending], fetch)
            top, cols = _canonical_top(queries[pending], positions, self._vectors_at, self.count, k)
            done = np.isneginf(last) | (top[:, -1] > last.astype(np.float64) + slack[pending]) | (fetch >= self.count)
            rows = pending[done]
            scores[rows] = top[done]
            ids[rows] = np.where(np.isfinite(top[done]), self.sorted_ids[np.minimum(cols[done], self.count - 1)], -1)
            pending, fetch = pending[~done], min(self.count, 4 * fetch)
        return scores, ids

    def _search_one(self, query: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`search` of one query [1, d] with FAISS's scan as the candidates: the same three steps on
        1-D arrays, without the batch's bookkeeping (a lone query, as `serve` and `retrieve` send,
        then costs about the scan, not 5x it on a small catalogue)."""
        slack = float(np.sqrt(np.dot(query[0].astype(np.float64), query[0].astype(np.float64)))) * self.slack_per_norm
        fetch = min(self.count, k + MARGIN)
        while True:
            size = min(self.count, fetch + len(excluded))
            approx, found = (row[0] for row in self.faiss_search(query, size))
            valid = found >= 0
            if len(excluded):
                valid &= ~_member(found, excluded)
            kept, kept_approx = found[valid][:fetch], approx[valid][:fetch]
            if len(kept) >= fetch:  # an item left out scores at most the fetch-th kept one
                last = float(kept_approx[-1])
            else:  # ... or the last fetched; -inf where every item was fetched
                last = -np.inf if found[-1] < 0 or size >= self.count else float(approx[-1])
            positions = self._positions_of(kept)[0]
            scored = canonical_scores(query[0], self._vectors_at(positions))  # [F]
            order = np.lexsort((positions, -scored))[:k]  # by score, descending, then by position
            top = np.full(k, -np.inf, dtype=np.float32)
            ids = np.full(k, -1, dtype=np.int64)
            top[:len(order)], ids[:len(order)] = scored[order], self.sorted_ids[positions[order]]
            if np.isneginf(last) or float(top[-1]) > last + slack or fetch >= self.count:
                return top[None], ids[None]
            fetch = min(self.count, 4 * fetch)

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """[..., d] float32 item vectors at `positions` [...] (id order, all valid), on the CPU."""
        width = self.width
        if self.device.type == "cpu":
            return self._blocks_np[positions // width, :, positions % width]
        where = torch.from_numpy(positions).to(self.device)
        return self.items[where // width, :, where % width].cpu().numpy()

    # ---------------------------------------------------------------------------- candidates
    def _candidates(self, queries: np.ndarray, excluded: Sequence[np.ndarray], n: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions [U, n] int64 in id order, -1 = none, best first by approximate score; last [U]
        float32: the approximate score no item left out exceeds, -inf where every eligible item is
        among the positions)."""
        if self.faiss_search is not None and (len(queries) < FAISS_BELOW or len(queries) >= FAISS_FROM):
            return self._faiss_candidates(queries, excluded, n)
        return self._product_candidates(queries, excluded, n)

    def _faiss_candidates(self, queries: np.ndarray, excluded: Sequence[np.ndarray], n: int
                          ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's top n + |excluded[u]| per query (the excess rounded up to a power of two, so that the
        rows fall into few searches), excluded ids dropped, the first n kept."""
        lengths = np.array([len(e) for e in excluded], dtype=np.int64)
        extra = np.where(lengths > 0, 1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64), 0)
        sizes = np.minimum(self.count, n + extra)
        # (row, position) keys of the excluded ids that are in the index
        flat = np.concatenate(excluded).astype(np.int64) if lengths.sum() else np.empty(0, np.int64)
        at, hit = self._positions_of(flat)
        banned = (np.repeat(np.arange(len(excluded)), lengths)[hit] * self.count + at[hit])
        positions = np.full((len(queries), n), -1, dtype=np.int64)
        last = np.full(len(queries), -np.inf, dtype=np.float32)
        for size in np.unique(sizes):
            rows = np.flatnonzero(sizes == size)
            approx, found = self.faiss_search(queries[rows], int(size))
            where, valid = self._positions_of(found)
            valid &= ~np.isin(rows[:, None] * self.count + where, banned)
            rank = np.cumsum(valid, axis=1)  # FAISS's rows are best first: keep the first n valid
            keep = valid & (rank <= n)
            slot = np.where(keep, rank - 1, n)
            out = np.full((len(rows), n + 1), -1, dtype=np.int64)
            np.put_along_axis(out, slot, np.where(keep, where, -1), axis=1)
            positions[rows] = out[:, :n]
            # an item left out scores at most the n-th kept one, or the last fetched if fewer were kept
            enough = rank[:, -1] >= n
            nth = np.take_along_axis(approx, np.argmax(rank >= n, axis=1)[:, None], axis=1)[:, 0]
            complete = (found[:, -1] < 0) | (size >= self.count)  # every item was fetched
            last[rows] = np.where(enough, nth, np.where(complete, -np.inf, approx[:, -1]))
        return positions, last

    def _positions_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in id order, found) of `ids` (any shape; ids not in the index: found False):
        a table lookup where the ids are dense (vocabulary indices), else a binary search."""
        if self._position is not None:
            inside = (ids >= 0) & (ids < len(self._position))
            at = np.where(inside, self._position[np.where(inside, ids, 0)], -1)
            return np.maximum(at, 0), at >= 0
        at = np.minimum(np.searchsorted(self.sorted_ids, ids), self.count - 1)
        return at, self.sorted_ids[at] == ids

    def _product_candidates(self, queries: np.ndarray, excluded: Sequence[np.ndarray], n: int
                            ) -> tuple[np.ndarray, np.ndarray]:
        """The top n by torch products with the item blocks (excluded ids at -inf), as the blocks go by."""
        users = len(queries)
        query = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        best = torch.full((users, n), -torch.inf, device=self.device)
        columns = torch.full((users, n), self.count, dtype=torch.long, device=self.device)
        pairs = _ExcludedPairs(excluded, self._positions_of, self.width, users)
        rows_per_group, blocks_per_group = self._group_shape(users)
        buffer = torch.empty(rows_per_group, blocks_per_group * self.width, device=self.device)
        for first_block in range(0, len(self.items), blocks_per_group):
            blocks = range(first_block, min(first_block + blocks_per_group, len(self.items)))
            for start in range(0, users, rows_per_group):
                stop = min(start + rows_per_group, users)
                scores = buffer.view(-1)[:(stop - start) * len(blocks) * self.width].view(stop - start, -1)
                self._score_group(query[start:stop], blocks, pairs.within(blocks, start, stop), start, scores)
                _keep_best(scores, first_block * self.width, start, best, columns)
        positions = torch.where(torch.isfinite(best), columns, -1)
        # best[:, -1] is -inf where fewer than n items are eligible: every one of them was kept
        return positions.cpu().numpy(), best[:, -1].cpu().numpy()

    def _group_shape(self, users: int) -> tuple[int, int]:
        """(query rows, item blocks) scored before each selection: about `entries` scores (the
        selection's per-call cost is then spread over many), at least one block's worth."""
        rows = min(users, max(1, self.entries // self.width))
        return rows, max(1, min(len(self.items), self.entries // (rows * self.width)))

    def _score_group(self, query: torch.Tensor, blocks: range, excluded: tuple[np.ndarray, np.ndarray],
                     first_row: int, scores: torch.Tensor) -> None:
        """Fill `scores` [len(query), len(blocks) * width] with the queries' scores of `blocks`, the
        (rows, columns) of `excluded` and the columns past the last item set to -inf."""
        for slot, block in enumerate(blocks):
            torch.mm(query, self.items[block], out=scores[:, slot * self.width:(slot + 1) * self.width])
            valid = self.count - block * self.width
            if valid < self.width:
                scores[:, slot * self.width + valid:(slot + 1) * self.width] = -torch.inf
        rows, cols = excluded
        if len(rows):
            rows, cols = torch.from_numpy(rows - first_row), torch.from_numpy(cols)
            scores[rows.to(self.device), cols.to(self.device)] = -torch.inf


# ------------------------------------------------------------------------------ canonical scores
def canonical_scores(query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[..., F] float32: query [..., d] . items [..., F, d], each product taken exactly in float64,
    summed over d as a fixed pairwise tree (zero-padded to a power of two), then rounded once to
    float32. Elementwise IEEE operations in one order: the same bits whatever the shapes, the batch
    or the device the candidates were found on."""
    terms = items.astype(np.float64) * query.astype(np.float64)[..., None, :]  # [..., F, d], exact
    width = 1 << max(0, (terms.shape[-1] - 1).bit_length())
    if width != terms.shape[-1]:
        terms = np.concatenate([terms, np.zeros((*terms.shape[:-1], width - terms.shape[-1]))], axis=-1)
    while terms.shape[-1] > 1:
        half = terms.shape[-1] // 2
        terms = terms[..., :half] + terms[..., half:]
    return terms[..., 0].astype(np.float32)


def _canonical_top(queries: np.ndarray, positions: np.ndarray, vectors_at: Callable[[np.ndarray], np.ndarray],
                   count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [U, k] float32, positions [U, k]) of the best k candidates `positions` [U, F] (-1 =
    none) of queries [U, d] by canonical score, ties to the smaller position (= id); -inf / `count`
    where there are fewer than k."""
    users, fetched = positions.shape
    scores = np.full((users, fetched), -np.inf, dtype=np.float32)
    step = max(1, CANONICAL_ENTRIES // max(1, fetched))
    for start in range(0, users, step):
        part = positions[start:start + step]
        scored = canonical_scores(queries[start:start + step], vectors_at(np.maximum(part, 0)))
        scores[start:start + step] = np.where(part >= 0, scored, -np.inf)
    keys = np.where(positions < 0, count, positions)
    order = np.lexsort((keys, -scores), axis=1)[:, :k]  # by score, descending, then by position
    top, cols = np.take_along_axis(scores, order, axis=1), np.take_along_axis(keys, order, axis=1)
    if fetched < k:
        top = np.concatenate([top, np.full((users, k - fetched), -np.inf, np.float32)], axis=1)
        cols = np.concatenate([cols, np.full((users, k - fetched), count)], axis=1)
    return top, cols


def _member(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """values [F] found in pool [P]: by broadcasting where both are short (np.isin sorts), else np.isin."""
    if len(values) * len(pool) <= 8192:
        return (values[:, None] == pool[None, :]).any(axis=1)
    return np.isin(values, pool)


def _block_width(count: int, most: int) -> int:
    """Columns per item block: as few blocks as `most` allows, evenly filled, in whole chunks where
    that stays within `most` (e.g. 9,628 items: 2 blocks of 4,864, not 8,192 + 1,436 of 8,192)."""
    even = -(-max(count, 1) // -(-max(count, 1) // most))
    chunks = -(-even // CHUNK) * CHUNK
    return chunks if chunks <= most else even


def _keep_best(scores: torch.Tensor, first_column: int, first_row: int, best: torch.Tensor,
               columns: torch.Tensor) -> None:
    """Merge one group's scores [R, W] into the running top-k (`best`, `columns` [U, k], best first)
    of rows first_row.. ; only rows whose group maximum beats their k-th score are touched.

    Ties may fall either way here: these are candidates, ranked again by canonical score, and the
    certificate needs only that no item left out scores above the k-th kept (which any top k has)."""
    k = best.shape[1]
    kth = best[first_row:first_row + len(scores), -1]
    chunked = k * CHUNK * 2 <= scores.shape[1] and scores.shape[1] % CHUNK == 0
    maxima = scores.view(len(scores), -1, CHUNK).amax(dim=2) if chunked else scores
    hit = torch.nonzero(maxima.amax(dim=1) > kth).squeeze(1)
    if len(hit) == 0:
        return
    every = len(hit) == len(scores)
    part = scores if every else scores[hit]
    if chunked:
        values, cols = _chunked_top(part, maxima if every else maxima[hit], k)
    else:
        values, cols = torch.topk(part, min(k, part.shape[1]), dim=1)
    rows = hit + first_row
    merged_values = torch.cat([best[rows], values], dim=1)
    merged_cols = torch.cat([columns[rows], cols + first_column], dim=1)
    values, at = torch.topk(merged_values, k, dim=1)
    best[rows], columns[rows] = values, merged_cols.gather(1, at)


def _chunked_top(scores: torch.Tensor, maxima: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k (values, columns) of scores [R, W] through the maxima [R, W / CHUNK] of their chunks of
    CHUNK columns: the k chunks with the largest maxima hold a top k (a chunk outside them has a
    maximum no larger than theirs, each of which is a distinct item), so only their k x CHUNK
    scores are ranked."""
    _, chunks = torch.topk(maxima, k, dim=1)
    cols = (chunks[:, :, None] * CHUNK + torch.arange(CHUNK, device=scores.device)).reshape(len(scores), -1)
    values, positions = torch.topk(scores.gather(1, cols), k, dim=1)
    return values, cols.gather(1, positions)


class _ExcludedPairs:
    """(row, column-in-block) of every excluded id found in the index, looked up by (block, rows)."""

    def __init__(self, excluded: Sequence[np.ndarray], positions_of: Callable[[np.ndarray], tuple],
                 width: int, padded: int):
        lengths = [len(e) for e in excluded]
        rows = np.repeat(np.arange(len(excluded), dtype=np.int64), lengths)
        flat = np.concatenate(excluded) if sum(lengths) else np.empty(0, dtype=np.int64)
        positions, found = positions_of(flat)  # (`ExactSearch._positions_of`)
        rows, positions = rows[found], positions[found]
        self.padded = padded
        keys = (positions // width) * padded + rows
        order = np.argsort(keys, kind="stable")
        self.keys, self.rows, self.cols = keys[order], rows[order], positions[order] % width
        self.blocks, self.width = positions[order] // width, width

    def within(self, blocks: range, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns counted from the first of `blocks`) of the pairs there for rows start..stop-1."""
        keys = [[block * self.padded + start, block * self.padded + stop] for block in blocks]
        bounds = np.searchsorted(self.keys, keys)
        picked = np.concatenate([np.arange(lo, hi) for lo, hi in bounds]) if len(bounds) else np.empty(0, int)
        slots = (self.blocks[picked] - blocks.start) * self.width
        return self.rows[picked], self.cols[picked] + slots
