"""Load a finished run for evaluation and serving.

The user tower (sequence encoder) comes from the best checkpoint; the item vectors come from the
run's stored index (the final vectors `fit` computed, plus items added later with
`pixelrec index --add-images`), so serving needs neither the cache nor the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.sequences import SequenceData
from ..errors import PixelrecError
from ..index.faiss_index import ItemIndex
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.sequence import build_sequence_encoder
from ..recommend.towers import TableTower
from .rundir import RunDir


@dataclass
class TrainedRun:
    run: RunDir
    cfg: FitConfig
    data: SequenceData
    model: Recommender  # TableTower over `table`
    index: ItemIndex
    table: torch.Tensor  # [max_id + 1, d]; row i = vector of item index i (0 and unused ids = zeros)
    item_names: np.ndarray  # index id -> item id string (training vocabulary + added items)


def load_trained(run_dir: str, device: str | torch.device = "cpu", index_device: str = "cpu") -> TrainedRun:
    run = RunDir(run_dir)
    meta = run.read_config()
    cfg = FitConfig.from_dict(meta["config"])
    data = run.read_data()
    if not run.index_dir.is_dir():
        raise PixelrecError(f"{run.path}: the run has no index/ (did `pixelrec fit` finish?); "
                            f"rebuild it with `pixelrec index {run.path}`")
    index = ItemIndex.load(run.index_dir, device=index_device)
    if index.dim != cfg.model.dim:
        raise PixelrecError(f"{run.index_dir}: the index holds {index.dim}-dimensional vectors but the run's model "
                            f"has --dim {cfg.model.dim}; rebuild it with `pixelrec index {run.path}`")
    vectors, ids = index.vectors, index.ids
    table = torch.zeros(int(ids.max()) + 1, vectors.shape[1])
    table[torch.from_numpy(np.array(ids))] = torch.from_numpy(np.array(vectors, dtype=np.float32))
    names = np.array(list(data.item_ids) + list(read_added_items(run)), dtype=object)
    if len(names) < len(table):
        raise PixelrecError(f"{run.index_dir}: the index holds item ids up to {len(table) - 1} but the run "
                            f"knows only {len(names) - 1} item names")

    model = Recommender(TableTower(table), build_sequence_encoder(cfg.model), cfg.model.max_len, cfg.loss)
    state = run.load_checkpoint(run.best, device)["model"]
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    model.encoder.load_state_dict(enc)
    model.to(device).eval()
    return TrainedRun(run, cfg, data, model, index, table, names)


def read_added_items(run: RunDir) -> list[str]:
    """Item ids added to the index after training (ids continue after the training vocabulary)."""
    path = run.index_dir / "added_items.txt"
    return path.read_text().split("\n")[:-1] if path.is_file() else []
