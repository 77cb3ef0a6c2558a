"""Exact top-k by matrix products of one fixed shape: the same results whatever the batch size.

A BLAS matrix product does not round a row's scores the same way for every number of rows (MKL,
for one, takes another kernel below 4 rows, and splits rows between threads differently), so a
query's scores could differ in the last bit between batchings. Here every score comes from one
call shape: the queries are padded to blocks of `rows` (8 on CPU, 256 on CUDA) and the items,
sorted by id, are stored as blocks of `width` columns ([d, width], zero-padded), and every product
is one `torch.mm` of [rows, d] x [d, width]. A query's scores therefore depend only on the query
and the item, never on its neighbours, the batch size or its position in the batch
(`tests/test_exact_search.py` checks batch sizes 1, 7, 64, 2,000 and all, bit for bit).

One product per `rows` queries is slow for large batches, so a group of queries is scored in
products of 2, 4, 8, 16 or 32 x `rows` rows where this BLAS has been seen to give every row the
bits that the fixed shape gives it: `_wide_steps` compares each such shape against the fixed tiles
on random data, once per process, device, dim, width and thread count, and keeps only the shapes
that agree bit for bit (none where any row differs: then every product is the fixed one).

The top-k is kept per query as the blocks go by: a block is looked at only where its best score
beats the query's current k-th score, and ties are ordered by the smaller id (the items' column
order), so the result equals a full stable sort of all scores, the excluded ids set to -inf
(`faiss_index.brute_force_search`). Excluded ids are set to -inf in the scores themselves, so no
over-fetch is needed; rows with fewer than k eligible items end with id -1, score -inf.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

QUERY_ROWS = {"cpu": 8, "cuda": 256}  # rows of every score product (fixed: batch invariance)
ITEM_COLUMNS = {"cpu": 8192, "cuda": 1 << 16}  # items per block (at most; fixed per index)
CHUNK = 64  # columns per chunk whose maximum preselects the chunks a top k can lie in
GROUP_ENTRIES = {"cpu": 1 << 20, "cuda": 0}  # query rows x items scored before selecting (0: one block)


class ExactSearch:
    """Exact inner-product top-k over fixed item vectors, on one torch device."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: torch.device):
        """`vectors` [N, d] float32 as searched (already normalised for cosine), `ids` [N] unique."""
        self.device = device
        kind = "cuda" if device.type == "cuda" else "cpu"
        self.rows = QUERY_ROWS[kind]
        count, dim = vectors.shape
        self.width = _block_width(count, ITEM_COLUMNS[kind])
        self.entries = GROUP_ENTRIES[kind]
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = np.asarray(ids)[order]
        self.count = count
        blocks = torch.zeros(-(-count // self.width), dim, self.width)
        for b, start in enumerate(range(0, count, self.width)):
            part = order[start:start + self.width]
            blocks[b, :, :len(part)] = torch.from_numpy(np.asarray(vectors[part], dtype=np.float32)).T
        self.items = blocks.to(device)  # [blocks, d, width]
        self.steps = _wide_steps(device, dim, self.width, self.rows)  # product rows, widest first

    def search(self, queries: np.ndarray, k: int,
               excluded: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scores [U, k] float32, ids [U, k] int64) of queries [U, d]; `excluded[u]` int64 ids."""
        users = len(queries)
        padded = -(-users // self.rows) * self.rows
        query = torch.zeros(padded, queries.shape[1], device=self.device)
        query[:users] = torch.from_numpy(queries).to(self.device)
        best = torch.full((padded, k), -torch.inf, device=self.device)
        best[users:] = torch.inf  # padding rows: never selected from
        columns = torch.full((padded, k), self.count, dtype=torch.long, device=self.device)
        pairs = _ExcludedPairs(excluded, self.sorted_ids, self.width, padded)
        rows_per_group, blocks_per_group = self._group_shape(padded)
        buffer = torch.empty(rows_per_group, blocks_per_group * self.width, device=self.device)
        for first_block in range(0, len(self.items), blocks_per_group):
            blocks = range(first_block, min(first_block + blocks_per_group, len(self.items)))
            for start in range(0, padded, rows_per_group):
                stop = min(start + rows_per_group, padded)
                scores = buffer.view(-1)[:(stop - start) * len(blocks) * self.width].view(stop - start, -1)
                self._score_group(query[start:stop], blocks, pairs.within(blocks, start, stop), start, scores)
                _keep_best(scores, first_block * self.width, start, best, columns)
        best, columns = best[:users].cpu(), columns[:users].cpu().numpy()
        found = torch.isfinite(best).numpy()
        ids = np.where(found, self.sorted_ids[np.minimum(columns, self.count - 1)], -1)
        return best.numpy(), ids.astype(np.int64)

    def _group_shape(self, padded: int) -> tuple[int, int]:
        """(query rows, item blocks) scored before each selection: about `entries` scores (the
        selection's per-call cost is then spread over many), at least one product's worth."""
        rows = min(padded, max(self.rows, self.entries // self.width // self.rows * self.rows))
        return rows, max(1, min(len(self.items), self.entries // (rows * self.width)))

    def _score_group(self, query: torch.Tensor, blocks: range, excluded: tuple[np.ndarray, np.ndarray],
                     first_row: int, scores: torch.Tensor) -> None:
        """Fill `scores` [len(query), len(blocks) * width] with the queries' scores of `blocks`, the
        (rows, columns) of `excluded` set to -inf."""
        for slot, block in enumerate(blocks):
            self._scores(query, block, scores[:, slot * self.width:(slot + 1) * self.width])
        rows, cols = excluded
        if len(rows):
            rows, cols = torch.from_numpy(rows - first_row), torch.from_numpy(cols)
            scores[rows.to(self.device), cols.to(self.device)] = -torch.inf

    def _scores(self, query: torch.Tensor, block: int, scores: torch.Tensor) -> None:
        """Fill `scores` [len(query), width] (a view) with one item block's scores, one product of the
        fixed shape per `rows` queries; columns past the last item are -inf."""
        items = self.items[block]
        start = 0
        while start < len(query):  # len(query) is a multiple of rows, the last step
            step = next(s for s in self.steps if s <= len(query) - start)
            torch.mm(query[start:start + step], items, out=scores[start:start + step])
            start += step
        valid = self.count - block * self.width
        if valid < self.width:
            scores[:, valid:] = -torch.inf


WIDE_MULTIPLES = (32, 16, 8, 4, 2)  # wider products tried, in multiples of the fixed rows (CPU only)
_STEPS: dict[tuple, list[int]] = {}  # (device, dim, width, rows, threads) -> product rows, widest first


def _wide_steps(device: torch.device, dim: int, width: int, rows: int) -> list[int]:
    """Row counts of the products a group is scored in: each m x `rows` of WIDE_MULTIPLES whose
    product [m x rows, dim] x [dim, width] gives every row the bits that products of [rows, dim]
    give it (random data, checked once), then `rows` itself. On CUDA the fixed rows are already
    a group's (see GROUP_ENTRIES), so only they are used."""
    key = (str(device), dim, width, rows, torch.get_num_threads())
    if key not in _STEPS:
        wide = [m * rows for m in WIDE_MULTIPLES] if device.type == "cpu" else []
        generator = torch.Generator().manual_seed(0)
        query = torch.randn(max(wide, default=rows), dim, generator=generator).to(device)
        items = torch.randn(dim, width, generator=generator).to(device)
        tiles = torch.cat([query[s:s + rows] @ items for s in range(0, len(query), rows)])
        _STEPS[key] = [m for m in wide if torch.equal(query[:m] @ items, tiles[:m])] + [rows]
    return _STEPS[key]


def _block_width(count: int, most: int) -> int:
    """Columns per item block: as few blocks as `most` allows, evenly filled, in whole chunks where
    that stays within `most` (e.g. 9,628 items: 2 blocks of 4,864, not 8,192 + 1,436 of 8,192)."""
    even = -(-max(count, 1) // -(-max(count, 1) // most))
    chunks = -(-even // CHUNK) * CHUNK
    return chunks if chunks <= most else even


def _keep_best(scores: torch.Tensor, first_column: int, first_row: int, best: torch.Tensor,
               columns: torch.Tensor) -> None:
    """Merge one block's scores [R, W] into the running top-k (`best`, `columns` [U, k], sorted by
    score desc then column asc) of rows first_row.. ; only rows whose block maximum beats their
    k-th score are touched (a tie with it cannot enter: its column is larger)."""
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
        values, cols = _block_top(part, min(k, part.shape[1]))
    rows = hit + first_row
    merged_values = torch.cat([best[rows], values], dim=1)
    merged_cols = torch.cat([columns[rows], cols + first_column], dim=1)
    order = torch.argsort(merged_cols, dim=1, stable=True)
    merged_values, merged_cols = merged_values.gather(1, order), merged_cols.gather(1, order)
    order = torch.argsort(merged_values, dim=1, descending=True, stable=True)[:, :k]
    best[rows], columns[rows] = merged_values.gather(1, order), merged_cols.gather(1, order)


def _chunked_top(scores: torch.Tensor, maxima: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_block_top` of scores [R, W] through the maxima [R, W / CHUNK] of their chunks of CHUNK
    columns: the k chunks with the largest maxima (ties: the earlier chunk) hold the top k (each
    chunk ranked before one holding a top-k item holds an item ranked before that item), so only
    their k x CHUNK scores are ranked."""
    _, chunks = _block_top(maxima, k)
    chunks = torch.sort(chunks, dim=1).values  # column order, so ties still go to the smaller column
    cols = (chunks[:, :, None] * CHUNK + torch.arange(CHUNK, device=scores.device)).reshape(len(scores), -1)
    values, positions = _block_top(scores.gather(1, cols), k)
    return values, cols.gather(1, positions)


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k (values, columns) of each row, ties at the cut resolved to the smaller columns.

    `torch.topk` picks an arbitrary subset of equal values: one more value is taken, and where it
    equals the k-th (a tie at the cut, rare) the row is sorted in full (stable) instead."""
    if k >= scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    values, cols = torch.topk(scores, k + 1, dim=1)
    values, cols, next_value = values[:, :k], cols[:, :k], values[:, k]
    tied = (next_value == values[:, -1]) & torch.isfinite(next_value)
    if tied.any():
        rows = torch.nonzero(tied).squeeze(1)
        full_values, full_cols = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], cols[rows] = full_values[:, :k], full_cols[:, :k]
    return values, cols


class _ExcludedPairs:
    """(row, column-in-block) of every excluded id found in the index, looked up by (block, rows)."""

    def __init__(self, excluded: Sequence[np.ndarray], sorted_ids: np.ndarray, width: int, padded: int):
        lengths = [len(e) for e in excluded]
        rows = np.repeat(np.arange(len(excluded), dtype=np.int64), lengths)
        flat = np.concatenate(excluded) if sum(lengths) else np.empty(0, dtype=np.int64)
        positions = np.minimum(np.searchsorted(sorted_ids, flat), len(sorted_ids) - 1)
        found = sorted_ids[positions] == flat
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
