"""`--model visrank` runs: no training, no item vectors, no FAISS index (index/visrank.py says why).

`fit --model visrank --cache CACHE.h5` writes a run directory like any other (config.json, the data,
results.json) plus `visrank.npy`, the cached embedding of every vocabulary item, so the run needs no
cache afterwards. `evaluate` and `retrieve --user/--history` rank exactly by brute force; the commands
that read a published model (`serve`, `index`, `retrieve --users`, `add-items`, ...) refuse such a run
in one line (`trained.load_trained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sequences import SequenceData
from ..errors import PixelrecError
from ..index.evaluate import ranks_report
from ..index.metrics import target_ranks
from ..index.visrank import VisRank
from ..recommend.config import FitConfig
from ..runtime import atomic_path, write_json
from .rundir import RunDir

VECTORS_FILE = "visrank.npy"
ENCODE_COMMAND = "`pixelrec encode --images COVERS --out CACHE.h5`"


def cached_vectors(cfg: FitConfig, data: SequenceData) -> np.ndarray:
    """[N + 1, E] float32: the cached embedding of every vocabulary item (row 0 = padding); refused in one
    line when the cache misses items of the interactions."""
    from ..encode.cache import open_cache

    cache = open_cache(cfg.items.cache)
    rows = cache.rows_for(data.item_ids[1:])
    if (rows < 0).any():
        example = ", ".join(map(str, data.item_ids[1:][rows < 0][:3]))
        raise PixelrecError(f"{cfg.items.cache}: {int((rows < 0).sum())} of {data.num_items} items of "
                            f"{cfg.interactions} have no cached embedding (e.g. {example}); --model visrank reads "
                            f"every item's: encode their covers with {ENCODE_COMMAND}")
    vectors = np.zeros((data.num_items + 1, cache.dim), dtype=np.float32)
    vectors[1:] = cache.read_embeddings(rows)
    return vectors


def scorer_of(cfg: FitConfig, vectors: np.ndarray) -> VisRank:
    return VisRank(vectors, k=cfg.model.visrank_k, max_len=cfg.model.max_len)


def write_vectors(run: RunDir, vectors: np.ndarray) -> None:
    with atomic_path(run.path / VECTORS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors, allow_pickle=False)


def evaluate_scorer(scorer: VisRank, data: SequenceData, split: str = "test", ks=(5, 10, 20),
                    cold_threshold: int = 1) -> dict[str, Any]:
    """The report of `index.evaluate.evaluate_model` (full ranking, the user's history excluded), ranked
    exactly by brute force."""
    if split not in ("valid", "test"):
        raise PixelrecError(f"unknown --split {split!r}; expected test or valid")
    histories = [data.history(u, split) for u in range(data.num_users)]
    _, ids = scorer.top(histories, max(ks))
    ranks = target_ranks(ids, data.targets(split))
    report = {"split": split, "users": int(data.num_users), "items": data.num_items,
              "protocol": f"full ranking over all {data.num_items} items, the user's history excluded",
              "index": {"spec": "brute force (visrank)", "exact": True}}
    return {**report, **ranks_report(ranks, data, split, ks, cold_threshold)}


class VisRankRun:
    """A finished `--model visrank` run, read back."""

    def __init__(self, run_dir: str):
        self.run = RunDir(run_dir)
        meta = self.run.read_config()
        self.cfg = self.run.fit_config(meta)
        self.data = self.run.read_data()
        path = self.run.path / VECTORS_FILE
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PixelrecError(f"{path}: missing or damaged ({exc}); refit the run") from None
        if vectors.ndim != 2 or len(vectors) != self.data.num_items + 1:
            raise PixelrecError(f"{path}: {vectors.shape} does not match the run's {self.data.num_items} items; "
                                f"refit the run")
        self.scorer = scorer_of(self.cfg, vectors)

    def evaluate(self, split: str = "test", ks=(5, 10, 20), cold_threshold: int = 1) -> dict[str, Any]:
        report = evaluate_scorer(self.scorer, self.data, split, ks, cold_threshold)
        report["run"] = {"dir": str(self.run.path), "items": self.cfg.items.kind, "model": "visrank",
                         "preset": self.cfg.preset, "loss": None, "encoder_random_init": None}
        return report

    def query(self, history: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the top k for a history of item indices, the history excluded."""
        scores, ids = self.scorer.top([history], k)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]


def is_visrank_run(run_dir: str) -> bool:
    """Whether run_dir holds a `--model visrank` run (False for anything else, damaged or not: the
    ordinary readers then say what is wrong)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        return config["config"]["model"]["model"] == "visrank"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_results(run: RunDir, test: dict[str, Any]) -> None:
    write_json(run.results, test)
