"""A run's item index: published by `fit` from the final item vectors, rebuilt with another FAISS
spec by `pixelrec index`, extended with new items by `pixelrec index --add-images`, or tuned to a recall target by
`pixelrec index --target-recall` (`index.tuning`: the fastest index, exact search included, that reaches
the target on a held-out sample of the run's own user queries, recorded in the version's tuning.json).

Items added after training are part of the run: their covers are kept in RUN_DIR/added/covers
(named by their index id), their names in the index version's added_items.jsonl (one JSON string
per line, so no name can split a line; every name passes the id rule, `data.ids`), and every rebuild
keeps them under their ids: a rebuild with another spec reuses their stored vectors, and a fit that
changes the model (`--resume`) re-encodes their covers through the new tower. Ids are never reused.
Every change is a new index version published through the run's manifest (`runs.rundir`), under
the run's lock, so concurrent readers see the index before or after it, never half of it. A tuned
version's choice survives `--add-images` (the same spec and search parameters, rebuilt the tuner's
way, tuning.json carried over); `--spec` and a fit that changes the model publish untuned versions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.ids import UNUSED_NAME, check_id
from ..data.images import DirImageStore, ImageStore, open_image_store
from ..encode.cache import open_cache
from ..encode.pipeline import EncodeConfig, encode_images
from ..errors import PixelrecError
from ..index.evaluate import EXACT_SPEC, item_table
from ..index.faiss_index import ItemIndex
from ..index.tuning import (TUNING_FILE, Candidate, Sample, Tuning, apply_breadth, build_candidate, check_target,
                            split_sample, tune_index)
from ..recommend.build import build_recommender
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..runtime import atomic_path, log, write_json
from .new_items import RunItemEncoder, item_encoder_for, load_model_state, run_item_encoder
from .rundir import ADDED_ITEMS_FILE, ENCODE_TMP_PREFIX, Published, RunDir
from .trained import TrainedRun, check_names_match_ids, load_index_version, load_trained, read_added_items

DEFAULT_TUNING_SAMPLE = 2000  # users sampled by --target-recall: half to tune on, half held out


@dataclass
class AddedItems:
    """What `pixelrec index --add-images` did."""

    added: int
    skipped: int  # covers of items the run already knows
    failed: dict[str, str] = field(default_factory=dict)  # name -> why its cover could not be added
    # (covers that failed to encode, and files that cannot be covers: invalid or reserved names, FIFOs, ...)
    first_id: int | None = None
    last_id: int | None = None


@dataclass
class AddedSet:
    """The run's added items: index ids and names (UNUSED_NAME for ids that were skipped)."""

    ids: np.ndarray  # [A] int64, the ids that hold an item
    names: list[str]  # names of every id after the vocabulary, padding included (added_items.jsonl)

    @classmethod
    def empty(cls) -> "AddedSet":
        return cls(np.empty(0, dtype=np.int64), [])


def write_index(run: RunDir, vectors: np.ndarray, ids: np.ndarray, added_names: list[str], spec: str = EXACT_SPEC,
                metric: str = "ip", nprobe: int | None = None, ef_search: int | None = None,
                device: str = "cpu") -> tuple[ItemIndex, Path]:
    """Build an index of `vectors` under `ids` and write it as the run's next index version."""
    index = ItemIndex.build(vectors, ids, spec=spec, metric=metric, nprobe=nprobe, ef_search=ef_search, device=device)
    return index, write_built_index(run, index, added_names)


def write_built_index(run: RunDir, index: ItemIndex, added_names: list[str], tuning: dict | None = None) -> Path:
    """Write a built index as the run's next index version (with its tuning record, if any)."""
    for name in added_names:  # every name came through the id rule; a last check before it is kept
        if name != UNUSED_NAME:
            check_id(name, "added item name", str(run.path))

    def write(directory: Path) -> None:
        index.save(directory)
        lines = "".join(json.dumps(n, ensure_ascii=False) + "\n" for n in added_names)
        (directory / ADDED_ITEMS_FILE).write_text(lines, encoding="utf-8")
        if tuning is not None:
            write_json(directory / TUNING_FILE, tuning)

    return run.write_index_version(write)


def added_set(run: RunDir, num_items: int) -> AddedSet:
    """The added items of the published index (none before the first publication)."""
    if run.read_manifest() is None:
        return AddedSet.empty()
    index_dir = run.published().index_dir
    names = read_added_items(index_dir)
    ids_file = index_dir / "item_ids.npy"
    if ids_file.is_file():  # names and ids must agree, or every added vector would go to another name
        check_names_match_ids(index_dir, num_items + 1 + len(names), int(np.load(ids_file, mmap_mode="r").max()),
                              run.path)
    ids = np.array([num_items + 1 + i for i, n in enumerate(names) if n != UNUSED_NAME], dtype=np.int64)
    return AddedSet(ids, names)


def publish_model(run: RunDir, model: Recommender, cfg: FitConfig, cache: dict | None, checkpoint: Path,
                  best_epoch: int, results: dict) -> Published:
    """Publish a newly trained model: its item vectors (added items re-encoded through it), its
    checkpoint and its test results."""
    table = item_table(model)  # [N + 1, d]
    vectors = table[1:].float().cpu().numpy()
    ids = np.arange(1, len(table), dtype=np.int64)
    added = added_set(run, len(table) - 1)
    if len(added.ids):
        log(f"{run.path}: re-encoding {len(added.ids)} added items through the new model")
        encoder = item_encoder_for(model, cfg, cache, str(run.path))
        vectors = np.concatenate([vectors, encode_added_covers(run, encoder, added.ids)])
        ids = np.concatenate([ids, added.ids])
    _, index_dir = write_index(run, vectors, ids, added.names)
    return run.publish(checkpoint, best_epoch, index_dir, results)


def rebuild_run_index(run_dir: str, spec: str = "Flat", metric: str = "ip", nprobe: int | None = None,
                      ef_search: int | None = None, device: str = "cpu") -> ItemIndex:
    """`pixelrec index RUN --spec ...`: the published vectors (added items included) under another index."""
    run = RunDir(run_dir)
    meta = run.read_config()  # refuses non-runs and incompatible versions
    with run.lock():
        published = run.published()
        data = run.read_data()
        dim = run.fit_config(meta).model.dim
        added = added_set(run, data.num_items)  # names of the added items: kept whatever the vectors' state
        stored = None
        try:
            current = load_index_version(published.index_dir)
            stored = (np.asarray(current.vectors), np.asarray(current.ids))
            if stored[0].shape[1] != dim:
                log(f"{published.index_dir}: stored item vectors are {stored[0].shape[1]}-dimensional, the run's "
                    f"model {dim}; recomputing them from {published.checkpoint.name}")
                stored = None
        except PixelrecError as exc:
            log(f"{exc}; recomputing the item vectors from {published.checkpoint.name}")
        if stored is None:
            stored = _recompute_vectors(run, published, meta, data, added)
        index, index_dir = write_index(run, *stored, added.names, spec=spec, metric=metric, nprobe=nprobe,
                                       ef_search=ef_search, device=device)
        run.publish(published.checkpoint, published.best_epoch, index_dir, keep_results=True)
    return index


def tune_run_index(run_dir: str, target_recall: float, k: int = 10, sample: int = DEFAULT_TUNING_SAMPLE,
                   metric: str = "ip", device: str = "cpu", seed: int = 0,
                   candidates: list[Candidate] | None = None) -> Tuning:
    """`pixelrec index RUN --target-recall R`: publish the fastest index that reaches
    recall@k >= R against exact search on a sample of the run's users (their user vectors after
    their whole history, the history excluded, as `retrieve` serves them), half of it held out.

    The published vectors (added items included) are indexed; the version's tuning.json records
    the choice, the recall reached, the speed-up over Flat, the sample and every setting measured.
    Exact search (Flat) is a candidate: it is published, with tuning.json's `why_flat` saying why,
    when no approximate index that reaches the target is faster.
    """
    check_target(target_recall)
    run = RunDir(run_dir)
    run.read_config()
    with run.lock():
        trained = load_trained(run_dir, device=device)
        published = trained.run.published()
        tuning_rows, heldout_rows = split_sample(trained.data.num_users, sample, seed)
        queries = _user_queries(trained, np.concatenate([tuning_rows, heldout_rows]))
        users = np.arange(len(tuning_rows) + len(heldout_rows))
        tuning = tune_index(np.asarray(trained.index.vectors), np.asarray(trained.index.ids),
                            Sample(*queries, users[:len(tuning_rows)], users[len(tuning_rows):]),
                            target_recall, k=k, metric=metric, candidates=candidates, seed=seed)
        record = tuning.record(seed=seed, heldout_users=[str(trained.data.user_ids[u]) for u in heldout_rows],
                               vectors_from=published.index_dir.name)
        index_dir = write_built_index(run, tuning.index, read_added_items(published.index_dir), record)
        run.publish(published.checkpoint, published.best_epoch, index_dir, keep_results=True)
    return tuning


def _user_queries(trained: TrainedRun, users: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user vectors [U, d], histories): each user's vector after their whole history, which they
    must not be recommended (as `retrieve --user` serves them)."""
    histories = [trained.data.history(int(u), "all") for u in users]
    return trained.model.encode_histories(histories, item_table=trained.table, users=np.asarray(users)), histories


def read_tuning(index_dir: Path) -> dict | None:
    """The tuning record of an index version (None for versions not built by --target-recall)."""
    path = index_dir / TUNING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        record = exc
    if not isinstance(record, dict) or not isinstance(record.get("spec"), str) \
            or not isinstance(record.get("params"), dict):
        raise PixelrecError(f"{path}: not a tuning record; tune the index again with "
                            f"`pixelrec index {index_dir.parent.parent} --target-recall R`")
    return record


def rebuild_tuned(vectors: np.ndarray, ids: np.ndarray, tuning: dict) -> ItemIndex:
    """The index a tuning record describes, over new vectors: same spec and search parameters."""
    params = tuning["params"]
    knob, value = ("nprobe", params.get("nprobe")) if params.get("nprobe") else ("efSearch", params.get("ef_search"))
    candidate = Candidate(tuning["spec"], knob, (int(value),) if value else (), params.get("k_factor"))
    built = build_candidate(vectors, ids, candidate, tuning.get("metric", "ip"), int(tuning.get("seed", 0)))
    if value:
        apply_breadth(built, candidate, int(value))
    return built.index


def _recompute_vectors(run: RunDir, published: Published, meta: dict, data, added: AddedSet
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Every item's vector from the published checkpoint: the vocabulary through the full item
    tower, the added items through their kept covers."""
    cfg = run.fit_config(meta)
    model = build_recommender(cfg, data)
    load_model_state(model, run.load_checkpoint(published.checkpoint, "cpu", published.checkpoint_sha256),
                     published.checkpoint)
    table = item_table(model)
    vectors, ids = table[1:].float().cpu().numpy(), np.arange(1, len(table), dtype=np.int64)
    if len(added.ids):
        encoder = item_encoder_for(model, cfg, meta.get("cache"), str(run.path))
        vectors = np.concatenate([vectors, encode_added_covers(run, encoder, added.ids)])
        ids = np.concatenate([ids, added.ids])
    return vectors, ids


def encode_added_covers(run: RunDir, encoder: RunItemEncoder, ids: np.ndarray) -> np.ndarray:
    """Vectors [A, d] of the added items `ids` from their covers kept in RUN_DIR/added/covers."""
    store = DirImageStore(run.added_covers) if run.added_covers.is_dir() else None
    wanted = [str(int(i)) for i in ids]
    missing = [i for i in wanted if store is None or i not in store]
    if missing:
        raise PixelrecError(f"{run.added_covers}: the kept cover of added item id {missing[0]} is missing, so it "
                            f"cannot be re-encoded; restore it or refit the run")
    names, vectors, failed = _encode(run, str(run.added_covers), wanted, encoder)
    if failed:
        item, reason = next(iter(failed.items()))
        raise PixelrecError(f"{run.added_covers}: the kept cover of added item id {item} cannot be encoded ({reason})")
    order = {n: row for row, n in enumerate(names)}
    return vectors[[order[i] for i in wanted]]


def add_images_to_run(run_dir: str, images: str, device: str = "cpu", batch_size: int = 64,
                      workers: int | None = None, follow_symlinks: bool = False) -> AddedItems:
    """Encode new covers through the run's published tower and add them to its index under new ids.

    Ids continue after the largest id in use (never reused or shifted). Covers of items the run
    already knows are skipped; covers that fail to load, and files that cannot be covers (names the
    id rule refuses, reserved names, special files, broken links, links leading outside `images`
    unless `follow_symlinks`) are reported as failed with the reason and not added.
    """
    run = RunDir(run_dir)
    run.read_config()
    with run.lock():
        published = run.published()
        index = load_index_version(published.index_dir)
        vocab = run.read_data().item_ids
        added_before = read_added_items(published.index_dir)
        known = set(map(str, vocab)) | set(added_before)
        store = open_image_store(images, follow_symlinks)
        new_ids = [i for i in store.ids() if i not in known]
        skipped = len(store) - len(new_ids)
        if not new_ids:
            return AddedItems(added=0, skipped=skipped, failed=dict(store.refused))
        encoder = run_item_encoder(run_dir, device)
        names, vectors, failed = _encode(run, images, new_ids, encoder, batch_size, workers, follow_symlinks)
        failed = {**store.refused, **failed}
        if not names:
            return AddedItems(added=0, skipped=skipped, failed=failed)
        n_names = len(vocab) + len(added_before)  # names cover ids 0 .. n_names - 1
        first = max(int(index.ids.max()) + 1, n_names)  # after every id in use, indexed or named
        ids = np.arange(first, first + len(names), dtype=np.int64)
        _keep_covers(store, names, ids, run.added_covers)
        padding = [UNUSED_NAME] * (first - n_names)  # ids are never reused, even when names were skipped
        all_vectors = np.concatenate([np.asarray(index.vectors, dtype=np.float32), vectors])
        all_ids = np.concatenate([np.asarray(index.ids), ids])
        tuning = read_tuning(published.index_dir)
        if tuning is None:
            _, index_dir = write_index(run, all_vectors, all_ids, added_before + padding + names, spec=index.spec,
                                       metric=index.metric, nprobe=index.nprobe, ef_search=index.ef_search)
        else:  # keep the tuned choice: same spec and parameters, trained on a sample as the tuner does
            index_dir = write_built_index(run, rebuild_tuned(all_vectors, all_ids, tuning),
                                          added_before + padding + names, tuning)
        run.publish(published.checkpoint, published.best_epoch, index_dir, keep_results=True)
    return AddedItems(added=len(names), skipped=skipped, failed=failed, first_id=int(ids[0]), last_id=int(ids[-1]))


def _encode(run: RunDir, images: str, item_ids: list[str], encoder: RunItemEncoder, batch_size: int = 64,
            workers: int | None = None, follow_symlinks: bool = False) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(encoded names, their vectors [n, d] float32, failures) of `item_ids` from an image store."""
    device = str(next(encoder.parameters()).device)
    with tempfile.TemporaryDirectory(dir=run.path, prefix=f"{ENCODE_TMP_PREFIX}{os.getpid()}-") as tmp:
        summary = encode_images(EncodeConfig(images=images, out=f"{tmp}/new.h5", item_ids=item_ids,
                                             batch_size=batch_size, num_workers=workers, device=device,
                                             float32=True, skip_missing=True, follow_symlinks=follow_symlinks),
                                encoder=encoder)
        with open_cache(f"{tmp}/new.h5") as cache:
            return [str(i) for i in cache.item_ids], cache.load_embeddings(), summary.failed


def _keep_covers(store: ImageStore, names: list[str], ids: np.ndarray, directory: Path) -> None:
    """Copy the covers of newly added items into the run (as <id>.<ext>) so rebuilds can re-encode them."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():  # left by an addition that was interrupted before publishing
        if stale.stem.isdigit() and int(stale.stem) >= int(ids[0]):
            stale.unlink()
    for name, i in zip(names, ids):
        if isinstance(store, DirImageStore):
            source = store.path_of(name)
            with atomic_path(directory / f"{int(i)}{source.suffix.lower()}") as tmp:
                shutil.copyfile(source, tmp)
        else:  # LMDB records are raw pixels: PNG keeps them exactly
            with atomic_path(directory / f"{int(i)}.png") as tmp:
                store.load(name).save(tmp, format="PNG")
