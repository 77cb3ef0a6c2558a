"""The run directory: what `fit` writes and `evaluate` / `retrieve` / `index` read.

    RUN_DIR/
      config.json          every setting, the data summary and fingerprint, pixelrec version
      items.txt users.txt  vocabularies (line i = index i; items.txt line 0 is [PAD])
      sequences.npz        every user's item indices in time order (CSR: offsets, items)
      metrics.jsonl        one line per finished epoch
      checkpoints/last.pt  model + optimiser + early-stopping state after the last finished epoch
      checkpoints/best.pt  model weights of the best validation epoch
      index/               FAISS index of the final item vectors (pixelrec.index.faiss_index)
      results.json         final test metrics

Every file is written atomically, so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.sequences import SequenceData
from ..encode.cache import cache_identity
from ..errors import PixelrecError
from ..recommend.config import FitConfig
from ..runtime import atomic_path, write_json

RUN_FORMAT = 1


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths
    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    best = property(lambda self: self.path / "checkpoints" / "best.pt")
    index_dir = property(lambda self: self.path / "index")
    results = property(lambda self: self.path / "results.json")

    def exists(self) -> bool:
        return self.config.is_file()

    # ---- config ------------------------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any], data: SequenceData, cache: dict[str, Any] | None = None) -> None:
        """config.json; `cache` = identity of the embedding cache the item tower reads (if any)."""
        write_json(self.config, {"pixelrec_version": __version__, "run_format": RUN_FORMAT,
                                 "data": data.summary(), "config": cfg, "cache": cache})

    def read_config(self) -> dict[str, Any]:
        if not self.exists():
            raise PixelrecError(f"{self.path}: not a pixelrec run directory (no config.json); run `pixelrec fit --out {self.path}` first")
        try:
            meta = json.loads(self.config.read_text())
        except json.JSONDecodeError as exc:
            raise PixelrecError(f"{self.config}: unreadable ({exc})") from None
        fmt, version = meta.get("run_format"), str(meta.get("pixelrec_version", "?"))
        if fmt != RUN_FORMAT or version.split(".")[0] != __version__.split(".")[0]:
            raise PixelrecError(
                f"{self.path}: run written by pixelrec {version} (run format {fmt}); this is pixelrec "
                f"{__version__} (format {RUN_FORMAT}); refit the run with this version"
            )
        return meta

    # ---- data --------------------------------------------------------------------------------
    def write_data(self, data: SequenceData) -> None:
        for name, ids in (("items.txt", data.item_ids), ("users.txt", data.user_ids)):
            bad = [t for t in ids if "\n" in str(t) or "\r" in str(t)]
            if bad:
                raise PixelrecError(f"id {bad[0]!r} contains a line break; ids must be single-line strings")
            with atomic_path(self.path / name) as tmp:
                tmp.write_text("".join(f"{t}\n" for t in ids))
        with atomic_path(self.path / "sequences.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, offsets=data.offsets, items=data.items,
                     dropped=np.array([data.dropped_users, data.dropped_interactions, data.dropped_items]))

    def read_data(self) -> SequenceData:
        meta = self.read_config()
        try:
            item_ids = np.array((self.path / "items.txt").read_text().split("\n")[:-1], dtype=object)
            user_ids = np.array((self.path / "users.txt").read_text().split("\n")[:-1], dtype=object)
            z = np.load(self.path / "sequences.npz")
            dropped = z["dropped"]
            data = SequenceData(item_ids, user_ids, z["offsets"], z["items"], int(dropped[0]),
                                int(dropped[1]), int(dropped[2]), source=meta["data"].get("source", ""))
        except (OSError, KeyError, ValueError) as exc:
            raise PixelrecError(f"{self.path}: run data is missing or damaged ({exc})") from None
        if data.fingerprint != meta["data"]["fingerprint"]:
            raise PixelrecError(f"{self.path}: items.txt/users.txt/sequences.npz do not match config.json's fingerprint")
        return data

    # ---- checkpoints & metrics ---------------------------------------------------------------
    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
        if not path.is_file():
            raise PixelrecError(f"{path}: checkpoint not found (did the run finish an epoch?)")
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:
            raise PixelrecError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        with atomic_path(self.metrics) as tmp:
            tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def run_cache_identity(cfg: FitConfig) -> dict | None:
    """Identity of the cache the item tower reads (recorded in config.json), None without a cache."""
    return cache_identity(cfg.items.cache) if cfg.items.uses_cache else None
