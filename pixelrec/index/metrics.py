"""Ranking metrics as small pure numpy functions (the protocol: docs/protocol.md).

Everything works on **0-based target ranks**, one target per user: rank 0 means the target was
recommended first; -1 means it is not in the user's top-K list at all. From ranks:

- Recall@k (= HR@k with one target) = 1 if 0 <= rank < k else 0;
- NDCG@k = 1 / log2(rank + 2) if 0 <= rank < k else 0 (the ideal DCG of a single target is 1);

averaged over users. The per-user variants (`hits`, `ndcg_gains`) let callers aggregate by any
grouping (popularity bucket, cold users) without recomputing rankings; `summarize_groups` does that.

A rank computed from a top-K list is only meaningful for k <= K: a target outside the top-K list
gets rank -1, so Recall@k for k > K would be under-counted. Fetch K = max(ks).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..errors import PixelrecError

DEFAULT_KS = (5, 10, 20)

# Item popularity buckets by training interaction count (log10 bins); `popularity_buckets` doc.
POPULARITY_BUCKETS = ("cold (0)", "1-9", "10-99", "100-999", "1000+")
_BUCKET_EDGES = np.array([1, 10, 100, 1000])


def target_ranks(topk_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each user's target in its row of `topk_ids` [U, K]; -1 when absent.

    If an id appears more than once in a row, its first position counts.
    """
    topk_ids = np.asarray(topk_ids)
    targets = np.asarray(targets)
    if topk_ids.ndim != 2 or targets.shape != (topk_ids.shape[0],):
        raise PixelrecError(
            f"target_ranks: expected top-k ids [U, K] and targets [U], got {topk_ids.shape} and {targets.shape}"
        )
    match = topk_ids == targets[:, None]
    found = match.any(axis=1)
    return np.where(found, match.argmax(axis=1), -1).astype(np.int64)


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k (HR@k): 1.0 where 0 <= rank < k, else 0.0."""
    ranks = _as_ranks(ranks)
    _check_k(k)
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k with one relevant item: 1/log2(rank + 2) where 0 <= rank < k, else 0.0."""
    ranks = _as_ranks(ranks)
    gains = 1.0 / np.log2(np.maximum(ranks, 0) + 2.0)
    return np.where(hits(ranks, k) > 0, gains, 0.0)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean Recall@k over users (NaN for no users)."""
    return _mean(hits(ranks, k))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k over users (NaN for no users)."""
    return _mean(ndcg_gains(ranks, k))


def summarize(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float | int | None]:
    """{"recall@5": .., "ndcg@5": .., ..., "users": U} for each k in `ks`.

    With no users the metric values are None (JSON null) rather than NaN.
    """
    ranks = _as_ranks(ranks)
    summary: dict[str, float | int | None] = {}
    for k in ks:
        empty = len(ranks) == 0
        summary[f"recall@{k}"] = None if empty else recall_at_k(ranks, k)
        summary[f"ndcg@{k}"] = None if empty else ndcg_at_k(ranks, k)
    summary["users"] = int(len(ranks))
    return summary


def summarize_groups(
    ranks: np.ndarray, groups: np.ndarray, ks: Iterable[int] = DEFAULT_KS, order: Sequence[str] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """`summarize` per group label (e.g. the popularity bucket of each user's target).

    `groups` [U] holds one label per user. Labels in `order` come first and in that order, each
    reported even when empty (users 0); other labels follow sorted.
    """
    ranks = _as_ranks(ranks)
    groups = np.asarray(groups)
    if groups.shape != ranks.shape:
        raise PixelrecError(f"summarize_groups: {len(groups)} group labels for {len(ranks)} users")
    ks = tuple(ks)
    labels = list(order or [])
    labels += sorted(set(groups.tolist()) - set(labels))
    return {label: summarize(ranks[groups == label], ks) for label in labels}


def sampled_ranks(target_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each target among itself and its N sampled negatives (sampled protocol).

    rank = number of negatives scoring >= the target: ties count **pessimistically** (a tied
    negative is ranked above the target), so a model that gives every item the same score gets
    the worst rank instead of a perfect one. NaN negatives are ignored; a NaN target gets rank N.
    """
    target_scores = np.asarray(target_scores, dtype=np.float64)
    negative_scores = np.asarray(negative_scores, dtype=np.float64)
    if negative_scores.ndim != 2 or target_scores.shape != (negative_scores.shape[0],):
        raise PixelrecError(
            f"sampled_ranks: expected target scores [U] and negative scores [U, N], "
            f"got {target_scores.shape} and {negative_scores.shape}"
        )
    ranks = (negative_scores >= target_scores[:, None]).sum(axis=1)
    return np.where(np.isnan(target_scores), negative_scores.shape[1], ranks).astype(np.int64)


def popularity_buckets(counts: np.ndarray) -> np.ndarray:
    """Bucket label of every item from its training interaction count (log10 bins).

    Buckets (POPULARITY_BUCKETS): "cold (0)" for 0, then "1-9", "10-99", "100-999", "1000+";
    the boundaries belong to the upper bucket (10 -> "10-99", 1000 -> "1000+").
    `counts` is indexed by item vocabulary id (counts[0] is the padding index).
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or (counts < 0).any():
        raise PixelrecError("popularity_buckets: expected a 1-d array of non-negative interaction counts")
    return np.asarray(POPULARITY_BUCKETS, dtype=object)[np.searchsorted(_BUCKET_EDGES, counts, side="right")]


def target_buckets(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Popularity bucket label of each user's target item id (see `popularity_buckets`)."""
    targets = np.asarray(targets)
    outside = targets[(targets < 0) | (targets >= len(counts))]
    if len(outside):
        raise PixelrecError(
            f"target item id {outside[0]} is outside the item counts (ids 0..{len(counts) - 1})"
        )
    return popularity_buckets(counts)[targets]


def _as_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise PixelrecError(f"expected a 1-d integer array of ranks, got {ranks.dtype} with shape {ranks.shape}")
    return ranks


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise PixelrecError(f"k must be a positive integer, got {k}")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
