"""VisRank (the PixelRec reference's ViNet/visrank.py): a training-free visual baseline.

An item's score for a history is the mean of its k largest cosine similarities to the history's
last `max_len` items (k = 1, the reference's `top_num`: the largest), over the items' cached
embeddings. That is not one dot product of a user vector and an item vector, so a FAISS index cannot
rank it unchanged: `VisRank.top` ranks exactly by brute force (the catalogue times the history's
items, in chunks of users), which costs N x H x E multiply-adds per history (N items, H <= max_len
history items, E the embedding width).
"""

from __future__ import annotations

import numpy as np


class VisRank:
    def __init__(self, vectors: np.ndarray, k: int = 1, max_len: int = 50):
        """vectors [N + 1, E]: each vocabulary item's cached embedding (row 0 = padding); they are scaled
        to unit length, so dot products are cosine similarities (a zero row stays zero)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        self.k, self.max_len = int(k), int(max_len)

    @property
    def num_items(self) -> int:
        return len(self.vectors) - 1

    def scores(self, history: np.ndarray) -> np.ndarray:
        """[N + 1] the score of every item for one history of item indices (oldest first); row 0 (padding)
        is -inf. The mean of the min(k, H) largest similarities; all zero for an empty history."""
        hist = np.asarray(history, dtype=np.int64)[-self.max_len :]
        out = np.zeros(len(self.vectors), dtype=np.float32)
        if len(hist):
            sims = self.vectors @ self.vectors[hist].T  # [N + 1, H]
            k = min(self.k, len(hist))
            out = np.partition(sims, len(hist) - k, axis=1)[:, len(hist) - k :].mean(1)
        out[0] = -np.inf
        return out

    def top(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [U, k] float32, ids [U, k] int64) of the k best items per history, best first, ties by
        the smaller id, the items of `exclude[u]` (default: the history itself) left out; -1 / -inf pad a
        row with fewer candidates (the convention of `ItemIndex.search`)."""
        exclude = histories if exclude is None else exclude
        ids = np.full((len(histories), k), -1, dtype=np.int64)
        scores = np.full((len(histories), k), -np.inf, dtype=np.float32)
        for u, hist in enumerate(histories):
            s = self.scores(hist)
            s[np.asarray(exclude[u], dtype=np.int64)] = -np.inf
            order = np.lexsort((np.arange(len(s)), -s))[:k]  # score descending, then the smaller id
            order = order[np.isfinite(s[order])]
            ids[u, : len(order)], scores[u, : len(order)] = order, s[order]
        return scores, ids
