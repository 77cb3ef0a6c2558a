"""Answering queries from one snapshot: names resolved to index ids, every history encoded in one
user-tower forward, and one FAISS search per distinct k.

The computation is that of `pixelrec retrieve` (`runs.retrieve.retrieve_one`): the user vector is
the state after the history's last item (the tower reads the last `max_len` items), the whole
history is excluded from the results, rows are ordered by score then smaller index id, and scores
are rounded to 6 decimals. A batch gives each query the same answer as on its own.

Item-item similarity (`SimilarQuery`) is by cosine by default: an exact scan over the unit-length
item vectors (`Snapshot.unit_vectors`), so an exact copy of a cover finds its original first
whatever the vectors' norms; `metric="ip"` searches the run's index by inner product instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .snapshot import Snapshot

_SHOWN = 10  # unknown ids named in one message


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = " ".join(str(message).split())
        super().__init__(self.message)

    def at(self, position: int) -> "ServeError":
        """The same error, naming the query's position in a batch request."""
        return ServeError(self.status, f"queries[{position}]: {self.message}")


@dataclass(frozen=True)
class RecommendQuery:
    """Top-k items for a user of the run or for an ad-hoc history (item ids, oldest first)."""

    user_id: str | None = None
    history: tuple[str, ...] | None = None
    k: int = 10
    exclude_history: bool = True


@dataclass(frozen=True)
class SimilarQuery:
    """The k items nearest to one item, by the run's item vectors (the item itself excluded)."""

    item_id: str
    k: int = 10
    metric: str = "cosine"  # or "ip": the run's index, by inner product


SIMILARITY_METRICS = ("cosine", "ip")

Query = Union[RecommendQuery, SimilarQuery]


@dataclass(frozen=True)
class RecommendAnswer:
    user_id: str | None
    history: list[str]  # the query's items, oldest first
    items: list[str]
    scores: list[float]
    warm: list[bool]  # per item: whether it had training interactions (cold: never in training, or added later)
    history_used: int  # the most recent history items the user tower read (at most max_len)
    history_truncated: bool  # the history was longer than max_len
    index_version: int


@dataclass(frozen=True)
class SimilarAnswer:
    item_id: str
    items: list[str]
    scores: list[float]
    warm: list[bool]
    item_warm: bool  # whether the query's item had training interactions
    metric: str
    index_version: int


Answer = Union[RecommendAnswer, SimilarAnswer]


@dataclass(frozen=True)
class _Resolved:
    query: Query
    history: np.ndarray | None  # index ids of a recommend query's history
    item: int | None  # index id of a similar query's item
    exclude: np.ndarray


def answer(snapshot: Snapshot, queries: Sequence[Query]) -> list[Answer | ServeError]:
    """One answer or error per query, in order, all from `snapshot`."""
    results: list[Answer | ServeError | None] = [None] * len(queries)
    resolved: list[tuple[int, _Resolved]] = []
    for position, query in enumerate(queries):
        try:
            resolved.append((position, _resolve(snapshot, query)))
        except ServeError as error:
            results[position] = error
    by_cosine = [(p, r) for p, r in resolved if isinstance(r.query, SimilarQuery) and r.query.metric == "cosine"]
    for position, r in by_cosine:
        results[position] = _answer(snapshot, r, *_cosine_neighbours(snapshot, r))
    scanned = {p for p, _ in by_cosine}
    searched = [(p, r) for p, r in resolved if p not in scanned]
    if searched:
        vectors = _query_vectors(snapshot, [r for _, r in searched])
        for (position, r), row in zip(searched, _search(snapshot, [r for _, r in searched], vectors)):
            results[position] = _answer(snapshot, r, *row)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ resolving
def _resolve(snapshot: Snapshot, query: Query) -> _Resolved:
    check_k(query.k, snapshot.size)
    if isinstance(query, SimilarQuery):
        if query.metric not in SIMILARITY_METRICS:
            raise ServeError(422, f"metric {query.metric!r}: expected one of {', '.join(SIMILARITY_METRICS)}")
        item = snapshot.items.get(query.item_id)
        if item is None:
            raise ServeError(404, f"unknown item {query.item_id!r}: not in the run's vocabulary or index")
        return _Resolved(query, None, item, np.array([item], dtype=np.int64))
    history = _history(snapshot, query)
    exclude = history if query.exclude_history else np.empty(0, dtype=np.int64)
    return _Resolved(query, history, None, exclude)


def check_k(k: int, size: int) -> None:
    if not 1 <= k <= size:
        raise ServeError(422, f"k must be between 1 and {size} (the items in the index), got {k}")


def _history(snapshot: Snapshot, query: RecommendQuery) -> np.ndarray:
    data = snapshot.trained.data
    if query.user_id is not None:
        user = data.user_index.get(query.user_id)
        if user is None:
            raise ServeError(404, f"unknown user {query.user_id!r}: not among the {data.num_users} users of the run")
        return np.asarray(data.history(user, "all"), dtype=np.int64)
    names = [n.strip() for n in query.history or () if n.strip()]
    if not names:
        raise ServeError(422, "the history is empty: give item ids, oldest first")
    unknown = [n for n in names if n not in snapshot.items]
    if unknown:
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise ServeError(404, f"unknown item id(s) in the history: {', '.join(map(repr, unknown[:_SHOWN]))}{more} "
                              f"(not in the run's vocabulary or index)")
    return np.array([snapshot.items[n] for n in names], dtype=np.int64)


# ------------------------------------------------------------------------------------ computing
def _query_vectors(snapshot: Snapshot, resolved: list[_Resolved]) -> np.ndarray:
    """[Q, d] float32: user vectors (one user-tower forward for all histories) and item vectors."""
    trained = snapshot.trained
    vectors = np.empty((len(resolved), trained.table.shape[1]), dtype=np.float32)
    users = [i for i, r in enumerate(resolved) if r.history is not None]
    if users:
        histories = [resolved[i].history for i in users]
        # the training user of a user-id query (MF / VBPR serve its learned vector); -1 = a history, folded in
        index = trained.data.user_index
        ids = np.array([index.get(getattr(resolved[i].query, "user_id", None) or "", -1) for i in users])
        vectors[users] = trained.model.encode_histories(histories, item_table=snapshot.device_table,
                                                        batch_size=max(len(histories), 1), users=ids)
    items = [i for i, r in enumerate(resolved) if r.item is not None]
    if items:
        vectors[items] = trained.table[[resolved[i].item for i in items]].numpy()
    return vectors


def _search(snapshot: Snapshot, resolved: list[_Resolved], vectors: np.ndarray
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scores, ids) of each query: one index search per distinct k, each row excluding its own ids."""
    rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(resolved)
    ks = np.array([r.query.k for r in resolved])
    for k in np.unique(ks):
        group = np.flatnonzero(ks == k)
        scores, ids = snapshot.index.search(vectors[group], int(k), exclude=[resolved[i].exclude for i in group])
        for j, i in enumerate(group):
            rows[i] = (scores[j], ids[j])
    return rows  # type: ignore[return-value]


def _cosine_neighbours(snapshot: Snapshot, r: _Resolved) -> tuple[np.ndarray, np.ndarray]:
    """(scores, index ids) of the k items of largest cosine to the query's item (itself excluded),
    by score then smaller index id: an exact scan over the unit-length vectors."""
    ids, unit = snapshot.unit_vectors
    row = int(np.searchsorted(ids, r.item))
    scores = unit @ unit[row]
    scores[row] = -np.inf
    k = min(r.query.k, len(ids) - 1)
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(ids) else np.arange(len(ids))[:k]
    top = top[np.lexsort((ids[top], -scores[top]))]
    return scores[top], ids[top]


def _answer(snapshot: Snapshot, r: _Resolved, scores: np.ndarray, ids: np.ndarray) -> Answer:
    keep = ids >= 0  # rows with fewer eligible items than k end in padding
    items = [snapshot.name(int(i)) for i in ids[keep]]
    rounded = [round(float(s), 6) for s in scores[keep]]
    warm = [snapshot.is_warm(int(i)) for i in ids[keep]]
    if isinstance(r.query, SimilarQuery):
        return SimilarAnswer(r.query.item_id, items, rounded, warm, snapshot.is_warm(int(r.item)), r.query.metric,
                             snapshot.version)
    history = r.history if r.history is not None else np.empty(0, dtype=np.int64)
    return RecommendAnswer(user_id=r.query.user_id, history=[snapshot.name(int(i)) for i in history], items=items,
                           scores=rounded, warm=warm, history_used=min(len(history), snapshot.max_len),
                           history_truncated=len(history) > snapshot.max_len, index_version=snapshot.version)
