"""Evaluation (PixelRec's protocol): user vectors searched against the item index, the user's history excluded.

Full ranking over the whole catalogue: the exact (Flat) FAISS top-k equals a brute-force full sort,
so Recall@k / NDCG@k are the PixelRec protocol's. A user's earlier items (for test: training items
and the validation item) are excluded from the ranking, as in the reference code, so a target that
repeats an earlier item counts as a miss. Reports break the metrics down by the target's
popularity bucket and into cold targets (fewer than `cold_threshold` training interactions).
`negatives=N` switches to the sampled protocol (the target among N random non-interacted items).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.sequences import SequenceData
from ..errors import PixelrecError
from .faiss_index import ItemIndex
from .metrics import POPULARITY_BUCKETS, sampled_ranks, summarize, summarize_groups, target_buckets, target_ranks

EXACT_SPEC = "Flat"


def item_table(model) -> torch.Tensor:
    """[N + 1, d] item vectors of the whole catalogue (row 0 = padding)."""
    model.eval()
    return model.tower.all_vectors()


def build_item_index(table: torch.Tensor, spec: str = EXACT_SPEC, device: str = "cpu", **kw) -> ItemIndex:
    vectors = table[1:].float().cpu().numpy()
    ids = np.arange(1, len(table), dtype=np.int64)
    return ItemIndex.build(vectors, ids, spec=spec, metric="ip", device=device, **kw)


@torch.no_grad()
def evaluate_model(
    model,
    data: SequenceData,
    split: str = "test",
    ks: tuple[int, ...] = (5, 10, 20),
    batch_size: int = 1024,
    cold_threshold: int = 1,
    tower_kind: str | None = None,
    index_spec: str | None = None,
    index_options: dict | None = None,
    negatives: int = 0,
    seed: int = 0,
    table: torch.Tensor | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Metrics of `split` ('valid' | 'test'); see the module doc. Returns a JSON-ready report."""
    if split not in ("valid", "test"):
        raise PixelrecError(f"unknown --split {split!r}; expected test or valid")
    if negatives < 0:
        raise PixelrecError(f"--negatives {negatives}: expected 0 (full ranking) or a positive number of negatives")
    model.eval()
    table = item_table(model) if table is None else table
    users = np.arange(data.num_users)
    histories = [data.history(u, split) for u in users]
    targets = data.targets(split)
    queries = model.encode_histories(histories, item_table=table, batch_size=batch_size)
    counts = data.train_counts
    report: dict[str, Any] = {"split": split, "users": int(len(users)), "items": data.num_items}

    if negatives:
        ranks = _sampled_protocol(queries, table, data, split, targets, negatives, seed)
        report["protocol"] = f"sampled: target vs {negatives} random non-interacted items per user"
    else:
        k_max = max(ks)
        exact = build_item_index(table, EXACT_SPEC, device=device)
        _, exact_ids = exact.search(queries, k_max, exclude=histories)
        report["protocol"] = f"full ranking over all {data.num_items} items, the user's history excluded"
        ranked_ids = exact_ids
        if index_spec and index_spec != EXACT_SPEC:
            approx = build_item_index(table, index_spec, device=device, **(index_options or {}))
            _, ranked_ids = approx.search(queries, k_max, exclude=histories)
            report["index"] = {"spec": approx.spec, "exact": False, "nprobe": approx.nprobe, "ef_search": approx.ef_search,
                               **{f"recall_vs_exact@{k}": _overlap(ranked_ids, exact_ids, k) for k in ks}}
        else:
            report["index"] = {"spec": EXACT_SPEC, "exact": True}
        ranks = target_ranks(ranked_ids, targets)

    report["overall"] = summarize(ranks, ks)
    target_counts = counts[targets]
    cold = target_counts < cold_threshold
    report["cold_threshold"] = cold_threshold
    report["cold"] = summarize(ranks[cold], ks)
    report["warm"] = summarize(ranks[~cold], ks)
    report["buckets"] = summarize_groups(ranks, target_buckets(counts, targets), ks, order=POPULARITY_BUCKETS)
    untrained = int((counts[1:] == 0).sum())
    if tower_kind in ("id",) and untrained:
        report["notes"] = [f"{untrained} items have no training interactions; the id model scores them with "
                           f"their untrained (random initial) embeddings, so its cold-item metrics are near chance"]
    return report


def _overlap(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k that the approximate top-k finds."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], e[:k][e[:k] >= 0])) / max((e[:k] >= 0).sum(), 1)
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) if hits else 0.0


def _sampled_protocol(queries, table, data: SequenceData, split, targets, n: int, seed: int) -> np.ndarray:
    """Rank of each target among n uniform items the user never interacted with."""
    rng = np.random.default_rng(seed)
    vecs = table.float().cpu().numpy()
    negs = np.empty((len(targets), n), dtype=np.int64)
    for u in range(len(targets)):
        seen = set(data.sequence(u).tolist())
        if data.num_items - len(seen) < n:
            raise PixelrecError(f"--negatives {n}: user {data.user_ids[u]} has only "
                                f"{data.num_items - len(seen)} items left to sample from")
        cand = rng.integers(1, data.num_items + 1, size=2 * n + 8)
        pick = [c for c in dict.fromkeys(cand.tolist()) if c not in seen][:n]
        while len(pick) < n:
            c = int(rng.integers(1, data.num_items + 1))
            if c not in seen and c not in pick:
                pick.append(c)
        negs[u] = pick
    target_scores = np.einsum("ud,ud->u", queries, vecs[targets])
    neg_scores = np.einsum("ud,und->un", queries, vecs[negs])
    return sampled_ranks(target_scores, neg_scores)
