"""Evaluation (PixelRec's protocol): user vectors searched against the item index, the user's history excluded.

Full ranking over the whole catalogue: the exact (Flat) top-k (`ItemIndex.search`, whose results
do not depend on how users are batched) equals a brute-force full sort,
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
from ..distributed import World
from ..errors import PixelrecError
from .faiss_index import ItemIndex
from .metrics import POPULARITY_BUCKETS, sampled_ranks, summarize, summarize_groups, target_buckets, target_ranks

EXACT_SPEC = "Flat"


def item_table(model) -> torch.Tensor:
    """[N + 1, d] item vectors of the whole catalogue (row 0 = padding)."""
    model.eval()
    return model.tower.all_vectors()


def build_item_index(table: torch.Tensor, spec: str = EXACT_SPEC, device: str = "cpu", **kw) -> ItemIndex:
    """The index of an item table [N + 1, d] (row 0 = padding) under ids 1..N."""
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
    world: World = World(),
    gpu_layout: str = "shard",
) -> dict[str, Any]:
    """Metrics of `split` ('valid' | 'test'); see the module doc. Returns a JSON-ready report.

    Users are encoded and searched `batch_size` at a time; with several processes (`world`) each
    takes a contiguous run of those batches and the per-user ranks are gathered in user order, so
    the report equals the one-process report exactly (every process returns it).
    """
    if split not in ("valid", "test"):
        raise PixelrecError(f"unknown --split {split!r}; expected test or valid")
    if negatives < 0:
        raise PixelrecError(f"--negatives {negatives}: expected 0 (full ranking) or a positive number of negatives")
    model.eval()
    table = item_table(model) if table is None else table
    targets = data.targets(split)
    counts = data.train_counts
    report: dict[str, Any] = {"split": split, "users": int(data.num_users), "items": data.num_items}

    if negatives:  # cheap, and its negatives come from one random stream: every process computes it whole
        histories = [data.history(u, split) for u in range(data.num_users)]
        queries = model.encode_histories(histories, item_table=table, batch_size=batch_size,
                                         users=np.arange(data.num_users))
        ranks = _sampled_protocol(queries, table, data, split, targets, negatives, seed)
        report["protocol"] = f"sampled: target vs {negatives} random non-interacted items per user"
    else:
        k_max = max(ks)
        exact = build_item_index(table, EXACT_SPEC, device=device, gpu_layout=gpu_layout)
        approx = None
        if index_spec and index_spec != EXACT_SPEC:
            approx = build_item_index(table, index_spec, device=device, gpu_layout=gpu_layout, **(index_options or {}))
        batches = [np.arange(i, min(i + batch_size, data.num_users)) for i in range(0, data.num_users, batch_size)]
        mine = [_rank_batch(model, data, split, users, table, exact, approx, targets, k_max, ks)
                for users in world.share(batches)]
        parts = [part for rank_parts in world.gather(mine) for part in rank_parts]  # user order
        ranks = np.concatenate([r for r, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
        report["protocol"] = f"full ranking over all {data.num_items} items, the user's history excluded"
        if approx is not None:
            hits = {k: np.concatenate([h[k] for _, h in parts]) for k in ks}
            report["index"] = {"spec": approx.spec, "exact": False, "nprobe": approx.nprobe,
                               "ef_search": approx.ef_search,
                               **{f"recall_vs_exact@{k}": float(hits[k].mean()) if len(hits[k]) else 0.0 for k in ks}}
        else:
            report["index"] = {"spec": EXACT_SPEC, "exact": True}

    report.update(ranks_report(ranks, data, split, ks, cold_threshold))
    untrained = int((counts[1:] == 0).sum())
    if tower_kind in ("id",) and untrained:
        report["notes"] = [f"{untrained} items have no training interactions; the id model scores them with "
                           f"their untrained (random initial) embeddings, so its cold-item metrics are near chance"]
    return report


def ranks_report(ranks: np.ndarray, data: SequenceData, split: str, ks, cold_threshold: int) -> dict[str, Any]:
    """The metrics part of a report from each user's target rank: overall, cold / warm targets (fewer /
    at least `cold_threshold` training interactions) and by the target's popularity bucket."""
    counts, targets = data.train_counts, data.targets(split)
    cold = counts[targets] < cold_threshold
    return {"overall": summarize(ranks, ks), "cold_threshold": cold_threshold, "cold": summarize(ranks[cold], ks),
            "warm": summarize(ranks[~cold], ks),
            "buckets": summarize_groups(ranks, target_buckets(counts, targets), ks, order=POPULARITY_BUCKETS)}


def _rank_batch(model, data: SequenceData, split: str, users: np.ndarray, table: torch.Tensor, exact: ItemIndex,
                approx: ItemIndex | None, targets: np.ndarray, k_max: int, ks) -> tuple[np.ndarray, dict]:
    """(rank of each user's target [u], per k the share of the exact top-k the approximate index found)."""
    histories = [data.history(u, split) for u in users]
    queries = model.encode_histories(histories, item_table=table, batch_size=len(users), users=users)
    _, exact_ids = exact.search(queries, k_max, exclude=histories)
    if approx is None:
        return target_ranks(exact_ids, targets[users]), {}
    _, approx_ids = approx.search(queries, k_max, exclude=histories)
    return target_ranks(approx_ids, targets[users]), {k: _overlap(approx_ids, exact_ids, k) for k in ks}


def _overlap(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    """Per user, the fraction of the exact top-k that the approximate top-k finds."""
    return np.array([len(np.intersect1d(a[:k][a[:k] >= 0], e[:k][e[:k] >= 0])) / max((e[:k] >= 0).sum(), 1)
                     for a, e in zip(approx_ids, exact_ids)], dtype=np.float64)


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
