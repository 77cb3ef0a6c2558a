"""A run's item index: built from the final item vectors by `fit`, rebuilt with another spec by
`pixelrec index`, extended with new items by `pixelrec index --add-images`.

The run's index directory keeps the item vectors and ids beside the FAISS index, so rebuilding
with another spec needs no model; if those files are gone, the vectors are recomputed from the
best checkpoint (which needs the run's cache or images).
"""

from __future__ import annotations

import tempfile

import numpy as np

from ..data.images import open_image_store
from ..encode.cache import open_cache
from ..encode.pipeline import EncodeConfig, encode_images
from ..errors import PixelrecError
from ..index.evaluate import EXACT_SPEC, build_item_index, item_table
from ..index.faiss_index import ItemIndex
from ..recommend.build import build_recommender
from ..recommend.config import FitConfig
from ..runtime import atomic_path, log
from .new_items import run_item_encoder
from .rundir import RunDir
from .trained import read_added_items


def build_run_index(model, run: RunDir, spec: str = EXACT_SPEC) -> ItemIndex:
    """Compute the final item vectors of `model` and store them, indexed, in the run directory."""
    index = build_item_index(item_table(model), spec)
    index.save(run.index_dir)
    return index


def stored_vectors(run: RunDir) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors [N, d], ids [N]) kept with the run's index, or None when absent."""
    vec, ids = run.index_dir / "item_vectors.npy", run.index_dir / "item_ids.npy"
    if not (vec.is_file() and ids.is_file()):
        return None
    try:
        return np.load(vec), np.load(ids)
    except (OSError, ValueError) as exc:
        raise PixelrecError(f"{run.index_dir}: stored item vectors unreadable ({exc}); delete {run.index_dir} and rerun "
                            f"`pixelrec index {run.path}` to recompute them from the checkpoint") from None


def recompute_vectors(run: RunDir, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Item vectors of the whole training vocabulary from the best checkpoint (full item tower)."""
    cfg = FitConfig.from_dict(run.read_config()["config"])
    data = run.read_data()
    model = build_recommender(cfg, data)
    model.load_state_dict(run.load_checkpoint(run.best, "cpu")["model"])
    table = item_table(model.to(device))
    return table[1:].float().cpu().numpy(), np.arange(1, len(table), dtype=np.int64)


def rebuild_run_index(run_dir: str, spec: str = "Flat", metric: str = "ip", nprobe: int | None = None,
                      ef_search: int | None = None, device: str = "cpu") -> ItemIndex:
    run = RunDir(run_dir)
    dim = run.read_config()["config"]["model"]["dim"]  # refuses non-runs and incompatible versions
    stored = stored_vectors(run)
    if stored is not None and stored[0].shape[1] != dim:
        log(f"{run.index_dir}: stored item vectors are {stored[0].shape[1]}-dimensional, the run's model {dim}; "
            f"recomputing them from {run.best}")
        stored = None
    elif stored is None:
        log(f"{run.index_dir}: no stored item vectors; recomputing them from {run.best}")
    if stored is None:
        stored = recompute_vectors(run, device)
    vectors, ids = stored
    index = ItemIndex.build(vectors, ids, spec=spec, metric=metric, nprobe=nprobe, ef_search=ef_search, device=device)
    index.save(run.index_dir)
    return index


def add_images_to_run(run_dir: str, images: str, device: str = "cpu", batch_size: int = 64,
                      workers: int | None = None) -> dict:
    """Encode new covers through the run's trained tower and add them to its index under new ids.

    Ids continue after the largest id in the index (never reused or shifted); the names of added
    items go to index/added_items.txt before the index is saved, so the two stay consistent.
    Covers of items the run already knows are skipped; covers that fail to load are reported.
    """
    run = RunDir(run_dir)
    run.read_config()
    index = ItemIndex.load(run.index_dir)
    vocab = run.read_data().item_ids
    added_before = read_added_items(run)
    known = set(map(str, vocab)) | set(added_before)
    store = open_image_store(images)
    new_ids = [i for i in store.ids() if i not in known]
    skipped = len(store) - len(new_ids)
    if not new_ids:
        return {"added": 0, "skipped": skipped, "failed": {}, "first_id": None, "last_id": None}

    encoder = run_item_encoder(run_dir, device)
    with tempfile.TemporaryDirectory(dir=run.path) as tmp:
        summary = encode_images(EncodeConfig(images=images, out=f"{tmp}/new.h5", item_ids=new_ids,
                                             batch_size=batch_size, num_workers=workers, device=device,
                                             float32=True), encoder=encoder)
        with open_cache(f"{tmp}/new.h5") as cache:
            names = [str(i) for i in cache.item_ids]
            vectors = cache.load_embeddings()
    if not names:
        return {"added": 0, "skipped": skipped, "failed": summary.failed, "first_id": None, "last_id": None}
    n_names = len(vocab) + len(added_before)  # names cover ids 0 .. n_names - 1
    first = max(int(index.ids.max()) + 1, n_names)  # after every id in use, indexed or named
    ids = np.arange(first, first + len(names), dtype=np.int64)
    padding = ["[unused]"] * (first - n_names)  # ids are never reused, even when names were skipped
    with atomic_path(run.index_dir / "added_items.txt") as tmp_path:
        tmp_path.write_text("".join(f"{n}\n" for n in added_before + padding + names))
    index.add(vectors, ids)
    index.save(run.index_dir)
    return {"added": len(names), "skipped": skipped, "failed": summary.failed,
            "first_id": int(ids[0]), "last_id": int(ids[-1])}
