"""Load a finished run for evaluation and serving.

The user tower (sequence encoder) comes from the best checkpoint; the item vectors come from the
run's stored index (the final vectors `fit` computed, plus items added later with
`pixelrec index --add-images`), so serving needs neither the cache nor the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.ids import UNUSED_NAME, id_problem, shown
from ..data.sequences import SequenceData
from ..errors import PixelrecError
from ..index.faiss_index import ItemIndex
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.sequence import build_sequence_encoder
from ..recommend.towers import TableTower
from ..runtime import resolve_device
from .rundir import ADDED_ITEMS_FILE, LEGACY_ADDED_ITEMS_FILE, Published, RunDir, strip_prefix


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
    added = read_added_items(published.index_dir)
    known = next((n for n in added if n in data.item_index), None) if added else None
    if known is not None:  # two ids under one name: lookups by name would pick one of them
        raise PixelrecError(f"{published.index_dir / ADDED_ITEMS_FILE}: added item {shown(known)} is also in the "
                            f"training vocabulary; the run directory is damaged")
    names = np.array(list(data.item_ids) + added, dtype=object)
    check_names_match_ids(published.index_dir, len(names), int(ids.max()), run.path)  # before sizing the table
    table = torch.zeros(int(ids.max()) + 1, vectors.shape[1])
    table[torch.from_numpy(np.array(ids))] = torch.from_numpy(np.array(vectors, dtype=np.float32))

    model = Recommender(TableTower(table), build_sequence_encoder(cfg.model, data.num_users), cfg.model.max_len,
                        cfg.loss)
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


def check_names_match_ids(index_dir: Path, n_names: int, max_id: int, run_path: Path) -> None:
    """Names (vocabulary + added items) cover ids 0 .. max id exactly: a name per id, none more."""
    if n_names < max_id + 1:
        raise PixelrecError(f"{index_dir}: the index holds item ids up to {max_id} but the run knows only "
                            f"{n_names - 1} item names; rebuild it with `pixelrec index {run_path}`")
    if n_names > max_id + 1:
        raise PixelrecError(f"{index_dir}: {n_names - 1} item names for item ids up to {max_id} (names split or "
                            f"added by hand?); the run directory is damaged")


def read_added_items(index_dir: Path) -> list[str]:
    """Names of the items added after training (ids continue after the training vocabulary).

    added_items.jsonl holds one JSON string per line, each a valid item id or `[unused]`. An index
    version written by an earlier pixelrec has added_items.txt (plain lines), read only when every
    line passes the id rule (a name holding a line break was split there and cannot be recovered).
    """
    path = index_dir / ADDED_ITEMS_FILE
    if path.is_file():
        return _checked_names(path, [_json_name(path, n, line) for n, line in enumerate(_lines(path), 1)])
    legacy = index_dir / LEGACY_ADDED_ITEMS_FILE
    if legacy.is_file():
        return _checked_names(legacy, _lines(legacy), legacy=True)
    return []


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PixelrecError(f"{path}: not UTF-8 text (byte {exc.start}); the run directory is damaged") from None
    if text and not text.endswith("\n"):
        raise PixelrecError(f"{path}: the last line is not terminated (truncated?); the run directory is damaged")
    return text.split("\n")[:-1]


def _json_name(path: Path, n: int, line: str) -> str:
    try:
        name = json.loads(line)
    except ValueError:
        name = None
    if not isinstance(name, str):
        raise PixelrecError(f"{path}: line {n} is not a JSON string; the run directory is damaged")
    return name


def _checked_names(path: Path, names: list[str], legacy: bool = False) -> list[str]:
    """`names`, refused in one line when one is not an item id (nor `[unused]`) or appears twice."""
    seen: set[str] = set()
    for n, name in enumerate(names, 1):
        if name == UNUSED_NAME:
            continue
        problem = id_problem(name) or ("appears twice" if name in seen else None)
        if problem is not None:
            advice = ("written by an earlier pixelrec whose plain-text format splits such names; this index "
                      "version's added items cannot be read safely" if legacy else "the run directory is damaged")
            raise PixelrecError(f"{path}: line {n}: name {shown(name)} {problem}; {advice}")
        seen.add(name)
    return names
