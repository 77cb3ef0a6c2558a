"""One immutable view of a run for serving: user tower, item vectors, FAISS index and item names.

Every answer is computed from one `Snapshot`, taken once at the start of a batch. A publication
(items added through the server, or by `pixelrec index` in another process) builds a new snapshot
beside the old one and swaps the reference, so a query sees the index before or after a change,
never half of it. Nothing inside a snapshot is modified after it is built.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch

from ...data.ids import UNUSED_NAME
from ...errors import PixelrecError
from ...index.faiss_index import ItemIndex
from ..rundir import Published, RunDir
from ..trained import TrainedRun, load_index_version, load_trained, read_added_items

_ATTEMPTS = 3  # reads retried when a writer publishes meanwhile


@dataclass(frozen=True)
class Snapshot:
    """A published model of a run, ready to answer queries (never changed once built)."""

    published: Published  # what the manifest named when this snapshot was read
    trained: TrainedRun  # user tower, users' histories, config, and this version's index / table / names
    device_table: torch.Tensor  # trained.table on the user tower's device
    items: Mapping[str, int]  # item id -> index id, for every item in the index

    @property
    def version(self) -> int:
        """The manifest's publication counter of this snapshot."""
        return self.published.version

    @property
    def index(self) -> ItemIndex:
        return self.trained.index

    @property
    def size(self) -> int:
        """Items in the index (the largest k a query may ask for)."""
        return self.trained.index.ntotal

    @property
    def max_len(self) -> int:
        """Most recent history items the user tower reads."""
        return self.trained.model.max_len

    @property
    def has_image_tower(self) -> bool:
        return self.trained.cfg.items.kind != "id"

    def name(self, index_id: int) -> str:
        return str(self.trained.item_names[index_id])

    def is_warm(self, index_id: int) -> bool:
        """Whether the item had training interactions (cold: never in training, or added after it)."""
        counts = self.trained.data.train_counts
        return 0 < index_id < len(counts) and bool(counts[index_id] > 0)

    def is_added(self, index_id: int) -> bool:
        """Whether the item was added after training (its cover is kept in RUN_DIR/added/covers)."""
        return index_id > self.trained.data.num_items

    @functools.cached_property
    def unit_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(index ids sorted [N], their item vectors scaled to unit length [N, d]) for cosine scans;
        computed on first use (a zero vector stays zero)."""
        ids = np.sort(np.asarray(self.index.ids, dtype=np.int64))
        vectors = self.trained.table[torch.from_numpy(ids)].numpy().astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return ids, vectors / np.maximum(norms, np.float32(1e-12))


def load_snapshot(run_dir: str, device: str = "cpu") -> Snapshot:
    """The run's published model, read as one consistent set (PixelrecError when it is not a run)."""
    run = RunDir(run_dir)
    run.read_config()  # a missing or foreign directory says so first
    for _ in range(_ATTEMPTS):
        before = run.published()
        trained = load_trained(run_dir, device=device)
        if run.published() == before:
            return _snapshot(before, trained)
    raise PixelrecError(f"{run_dir}: the run was republished {_ATTEMPTS} times while loading; try again")


def refresh_snapshot(current: Snapshot) -> Snapshot:
    """The snapshot of what the manifest names now: `current` itself when nothing was published,
    a new index on the same user tower after an index publication, a full reload after a new model."""
    run = current.trained.run
    for _ in range(_ATTEMPTS):
        published = run.published()
        if published == current.published:
            return current
        if published.checkpoint_sha256 != current.published.checkpoint_sha256:
            return load_snapshot(str(run.path), str(next(current.trained.model.parameters()).device))
        try:
            trained = _with_index(current.trained, published)
        except PixelrecError:
            if run.published() == published:
                raise
            continue  # a writer removed that version meanwhile: read the newer one
        if run.published() == published:
            return _snapshot(published, trained)
    raise PixelrecError(f"{run.path}: the run was republished {_ATTEMPTS} times while reloading; try again")


def _with_index(trained: TrainedRun, published: Published) -> TrainedRun:
    """`trained` with the item vectors, index and names of another index version of the same model."""
    index = load_index_version(published.index_dir)
    if index.dim != trained.cfg.model.dim:
        raise PixelrecError(f"{published.index_dir}: {index.dim}-dimensional vectors for a model of --dim "
                            f"{trained.cfg.model.dim}; rebuild it with `pixelrec index {trained.run.path}`")
    table = item_table(index)
    names = np.array(list(trained.data.item_ids) + read_added_items(published.index_dir), dtype=object)
    if len(names) < len(table):
        raise PixelrecError(f"{published.index_dir}: item ids up to {len(table) - 1} but only {len(names) - 1} "
                            f"item names; rebuild it with `pixelrec index {trained.run.path}`")
    return dataclasses.replace(trained, index=index, table=table, item_names=names)


def item_table(index: ItemIndex) -> torch.Tensor:
    """[max id + 1, d]: row i holds the vector of index id i (zeros for padding and unused ids)."""
    ids = np.asarray(index.ids)
    table = torch.zeros(int(ids.max()) + 1, index.dim)
    table[torch.from_numpy(ids)] = torch.from_numpy(np.array(index.vectors, dtype=np.float32))
    return table


def _snapshot(published: Published, trained: TrainedRun) -> Snapshot:
    device = next(trained.model.parameters()).device
    indexed = set(np.asarray(trained.index.ids).tolist())
    items = {str(name): i for i, name in enumerate(trained.item_names)
             if i in indexed and name != UNUSED_NAME}
    return Snapshot(published, trained, trained.table.to(device), MappingProxyType(items))
