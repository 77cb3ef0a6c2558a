"""Load a finished run for evaluation and serving.

The user tower (sequence encoder) comes from the best checkpoint; the item vectors come from the
run's stored index (the final vectors `fit` computed, plus items added later with
`pixelrec index --add-images`), so serving needs neither the cache nor the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.sequences import SequenceData
from ..errors import PixelrecError
from ..index.faiss_index import ItemIndex
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.sequence import build_sequence_encoder
from ..recommend.towers import TableTower
from ..runtime import resolve_device
from .rundir import ADDED_ITEMS_FILE, Published, RunDir, strip_prefix


@dataclass
class TrainedRun:
    run: RunDir
    cfg: FitConfig
    data: SequenceData
    model: Recommender  # TableTower over `table`
    index: ItemIndex
    table: torch.Tensor  # [max_id + 1, d]; row i = vector of item index i (0 and unused ids = zeros)
    item_names: np.ndarray  # index id -> item id string (training vocabulary + added items)


def load_trained(run_dir: str, device: str | torch.device = "cpu") -> TrainedRun:
    """The published model of a run (manifest): its user tower and stored item vectors, ready to serve."""
    device = resolve_device(str(device))
    run = RunDir(run_dir)
    meta = run.read_config()
    cfg = run.fit_config(meta)
    data = run.read_data()
    index, state, published = _load_published(run)
    if index.dim != cfg.model.dim:
        raise PixelrecError(f"{published.index_dir}: the index holds {index.dim}-dimensional vectors but the run's "
                            f"model has --dim {cfg.model.dim}; rebuild it with `pixelrec index {run.path}`")
    vectors, ids = index.vectors, index.ids
    table = torch.zeros(int(ids.max()) + 1, vectors.shape[1])
    table[torch.from_numpy(np.array(ids))] = torch.from_numpy(np.array(vectors, dtype=np.float32))
    names = np.array(list(data.item_ids) + read_added_items(published.index_dir), dtype=object)
    if len(names) < len(table):
        raise PixelrecError(f"{published.index_dir}: the index holds item ids up to {len(table) - 1} but the run "
                            f"knows only {len(names) - 1} item names; rebuild it with `pixelrec index {run.path}`")

    model = Recommender(TableTower(table), build_sequence_encoder(cfg.model), cfg.model.max_len, cfg.loss)
    try:
        model.encoder.load_state_dict(strip_prefix(state, "encoder."))
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise PixelrecError(f"{published.checkpoint}: the weights do not fit the settings in config.json "
                            f"({first}); the run directory is damaged") from None
    model.to(device).eval()
    return TrainedRun(run, cfg, data, model, index, table, names)


def _load_published(run: RunDir, attempts: int = 3) -> tuple[ItemIndex, dict, Published]:
    """(index, user-tower weights, what the manifest names), read as one consistent set.

    A writer publishing meanwhile may remove the files of an older version once two newer ones
    exist; the read is then retried on the new manifest, so a reader never mixes two versions.
    """
    for attempt in range(attempts):
        published = run.published()
        try:
            index = load_index_version(published.index_dir)
            state = run.load_checkpoint(published.checkpoint, "cpu", published.checkpoint_sha256)["model"]
            return index, state, published
        except PixelrecError:
            if attempt == attempts - 1 or run.published().version == published.version:
                raise
    raise AssertionError("unreachable")


def load_index_version(directory: Path, device: str = "cpu") -> ItemIndex:
    """The index of one published version (the manifest names it, so it must be there)."""
    if not directory.is_dir():
        raise PixelrecError(f"{directory}: the index the run's manifest names is missing; "
                            f"rebuild it with `pixelrec index {directory.parent.parent}`")
    return ItemIndex.load(directory, device=device)


def read_added_items(index_dir: Path) -> list[str]:
    """Names of the items added after training (ids continue after the training vocabulary)."""
    path = index_dir / ADDED_ITEMS_FILE
    if not path.is_file():
        return []
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except UnicodeDecodeError as exc:
        raise PixelrecError(f"{path}: not UTF-8 text (byte {exc.start}); rebuild the index with "
                            f"`pixelrec index {index_dir.parent.parent}`") from None
