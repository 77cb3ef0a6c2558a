"""`pixelrec fit`: the run-level training loop with per-epoch validation, early stopping,
checkpoints and resume, writing a run directory (`runs.rundir`).

Guarantees:
- Resume: every epoch draws its randomness from generators seeded by (seed, epoch)
  (`recommend.train`), and the model/optimiser/early-stopping state is checkpointed atomically
  after every finished epoch. A run killed at any point and restarted with `resume=True` continues
  after the last finished epoch and ends with the same weights and metrics as an uninterrupted
  run (on the same device).
- One writer: the whole fit holds the run's lock, so a second fit (or `pixelrec index`) on the
  same run directory is refused at once.
- A new run is built in a private staging directory beside RUN_DIR and moved into place only once
  it has a first finished epoch; with `overwrite`, the old run is replaced only then. A rejected
  input, a divergence or a kill before that leaves RUN_DIR (or its absence) as it was.
- Publication: the finished model (checkpoint, index, results) is named by the run's manifest,
  written last; continuing a finished run leaves the previous model readable until the new one is
  published whole.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..data.sequences import SequenceData, load_sequences
from ..encode.cache import read_cache_attrs
from ..encode.encoder import is_random_init, random_init_warning
from ..distributed import World
from ..errors import PixelrecError
from ..index.evaluate import evaluate_model
from ..recommend.batches import training_windows
from ..recommend.build import build_optimizer, build_recommender
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.models.registry import model_spec
from ..recommend.preset_check import check_preset_inputs
from ..recommend.train import TrainingDiverged, train_one_epoch
from ..runtime import FileLock, grad_scaler_for, log, plain_data, seed_everything
from .item_index import publish_model
from .rundir import RunDir, run_cache_identity
from .transfer import init_from_run

VALID_METRIC = "ndcg@10"
# Settings a resumed run may change: how long it trains, where, and paths that name the same inputs
# (the cache is compared by its content identity instead of its path).
RESUMABLE_CHANGES = {"train.epochs", "train.patience", "train.device", "items.cache", "out", "interactions"}


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    valid: dict[str, float]
    test: dict[str, Any]
    seconds: float
    seconds_per_epoch: float


@dataclass
class _Progress:
    """The early-stopping state checkpointed in last.pt."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    best_path: str | None = None  # relative to the run directory
    bad_epochs: int = 0

    @property
    def next_epoch(self) -> int:
        return len(self.history)

    def state(self) -> dict[str, Any]:
        """Plain data only (checkpoints hold nothing but tensors and plain data; see RunDir.load_checkpoint)."""
        return plain_data({"history": self.history, "bad_epochs": self.bad_epochs,
                           "best": {"epoch": self.best_epoch, "score": self.best_score, "path": self.best_path}})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Progress":
        best = state["best"]
        return cls(list(state["history"]), int(best["epoch"]), float(best["score"]), best.get("path"),
                   int(state["bad_epochs"]))


def fit(cfg: FitConfig, resume: bool = False, overwrite: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train the model `cfg` describes into the run directory `cfg.out` (see the module doc).

    `on_epoch(row)` is called (on rank 0) after each finished epoch with its metrics.jsonl row
    (`fit --tensorboard` writes them as TensorBoard scalars).

    Under torchrun every rank calls this: rank 0 alone holds the lock and writes the run directory
    (which must be on storage every rank can read), every rank trains its share of each batch.
    """
    cfg.validate()
    if resume and overwrite:
        raise PixelrecError("--resume continues the run in --out and --overwrite replaces it: give only one")
    check_preset_inputs(cfg)  # --preset pixelrec: a cache of the reference's function, or a refusal
    t0 = time.time()
    out = Path(cfg.out)
    world = distributed.init(cfg.train.device, rerun="rerun with --resume")  # how to continue after a lost rank
    encoder = image_encoder(cfg)
    warning = random_init_warning(*encoder) if encoder and cfg.preset != "pixelrec" else None  # the preset warns itself
    if warning and world.is_main:
        log(warning)
    world.check_same("fit settings", {"config": cfg.to_dict(), "resume": resume, "overwrite": overwrite})
    device = world.device(cfg.train.device)
    lock = RunDir(out).lock()
    world.on_main(lambda: _claim(lock, out))
    try:
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        data = world.agree(lambda: load_sequences(cfg.interactions, cfg.train.min_interactions))
        log(f"data: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
            f" ({data.dropped_users} users with < {cfg.train.min_interactions} interactions dropped,"
            f" {data.dropped_interactions} rows)")
        if not model_spec(cfg.model.model).trains:  # VisRank: nothing to train (runs/visrank.py)
            return world.on_main(lambda: _fit_without_training(cfg, data, out, resume, overwrite, t0))
        model = world.agree(lambda: build_recommender(cfg, data, device).to(device))
        resuming = resume and world.on_main(lambda: _check_resume(RunDir(out), cfg, data, model.softmax_choice))
        if resuming:
            state = world.agree(lambda: RunDir(out).load_checkpoint(RunDir(out).last, device))
            return _train(cfg, data, model, RunDir(out), state, device, t0, out, world, on_epoch)
        world.on_main(lambda: _check_new_target(out, overwrite, resume))
        if cfg.init_from:
            world.agree(lambda: init_from_run(model, cfg))
        staging = out.parent / f".{out.name}.staging-{world.on_main(os.getpid)}"
        try:
            return _train(cfg, data, model, RunDir(staging), None, device, t0, out, world, on_epoch)
        finally:
            if world.is_main:
                shutil.rmtree(staging, ignore_errors=True)  # gone already once promoted
    finally:
        if world.is_main:
            lock.release()


def _fit_without_training(cfg: FitConfig, data: SequenceData, out: Path, resume: bool, overwrite: bool,
                          t0: float) -> FitResult:
    """--model visrank: a run directory with the data, every item's cached embedding and results.json (its
    exact test metrics), put in place as a trained run is."""
    from .visrank import cached_vectors, evaluate_scorer, scorer_of, write_results, write_vectors

    name = cfg.model.model
    if resume:
        raise PixelrecError(f"--model {name} trains nothing, so there is nothing to --resume: drop --resume")
    if cfg.init_from:
        raise PixelrecError(f"--model {name} has no trained weights to start from: drop --init-from")
    _check_new_target(out, overwrite, resume)
    vectors = cached_vectors(cfg, data)
    scorer = scorer_of(cfg, vectors)
    valid = evaluate_scorer(scorer, data, "valid", cold_threshold=cfg.train.cold_threshold)
    test = evaluate_scorer(scorer, data, "test", cold_threshold=cfg.train.cold_threshold)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        run = RunDir(staging)
        _start_run_dir(run, cfg, data)
        write_vectors(run, vectors)
        write_results(run, test)
        _promote(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    overall = test["overall"]
    log(f"{name} (no training): test ndcg@10 {overall['ndcg@10']:.4f} recall@10 {overall['recall@10']:.4f}")
    return FitResult(run_dir=out, best_epoch=0, epochs_run=0,
                     valid={k: v for k, v in valid["overall"].items() if k != "users"}, test=test,
                     seconds=time.time() - t0, seconds_per_epoch=0.0)


def _train(cfg: FitConfig, data: SequenceData, model: Recommender, run: RunDir, state: dict | None,
           device: torch.device, t0: float, target: Path, world: World,
           on_epoch: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    optimizer = build_optimizer(model, cfg)
    progress = _Progress()
    if state is None:
        world.on_main(lambda: _start_run_dir(run, cfg, data, getattr(model, "softmax_choice", None)))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = _Progress.from_state(state)
        log(f"resuming {run.path} after epoch {progress.next_epoch - 1} (best valid {VALID_METRIC} "
            f"{progress.best_score:.4f} at epoch {progress.best_epoch})")
    step_model = _data_parallel(model, device, world)

    windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride,
                               keep_single=cfg.loss.mean_over == "sequences")
    if int(windows.trained.sum()) == 0:
        raise PixelrecError(f"{cfg.interactions}: no training sequence has two items; nothing to train on")
    precision = cfg.train.precision
    scaler = grad_scaler_for(device, precision)
    trained_now = 0
    while progress.next_epoch < cfg.train.epochs and progress.bad_epochs < cfg.train.patience:
        _train_epoch(cfg, data, model, step_model, optimizer, scaler, windows, run, progress, device, precision, world,
                     on_epoch)
        trained_now += 1
        if run.path != target:  # a new run: in place as soon as it has a first finished epoch
            world.on_main(lambda: _promote(run.path, target))
            run = RunDir(target)

    world.on_main(lambda: run.write_metrics(progress.history))  # also after a resume that had nothing left
    if progress.best_epoch < 0:
        raise PixelrecError(f"{target}: no epoch finished (--epochs {cfg.train.epochs})")
    best_path = run.path / progress.best_path
    model.load_state_dict(world.agree(lambda: run.load_checkpoint(best_path, device))["model"])
    published = world.on_main(lambda: _published_results(run, best_path)) if trained_now == 0 else None
    if published is not None:
        log(f"{run.path}: already finished and published (best epoch {progress.best_epoch}); nothing to do")
        test = published
    else:
        model.eval()
        test = evaluate_model(model, data, "test", ks=(5, 10, 20), batch_size=cfg.train.eval_batch_size,
                              cold_threshold=cfg.train.cold_threshold, tower_kind=cfg.items.kind, world=world)
        world.on_main(lambda: _publish(run, model, cfg, best_path, progress.best_epoch, test))
    train_times = [h["train_seconds"] for h in progress.history]
    best_row = progress.history[progress.best_epoch]
    result = FitResult(run.path, progress.best_epoch, len(progress.history),
                       valid={k[6:]: v for k, v in best_row.items() if k.startswith("valid_")}, test=test,
                       seconds=time.time() - t0, seconds_per_epoch=float(np.mean(train_times)))
    log(f"best epoch {progress.best_epoch}: test ndcg@10 {test['overall']['ndcg@10']:.4f} "
        f"recall@10 {test['overall']['recall@10']:.4f}")
    return result


def _claim(lock: FileLock, out: Path) -> None:
    """Take the run's lock (refused at once while another process holds it) and repair what a killed
    fit left beside the run."""
    lock.acquire()
    _recover_interrupted_replace(out)


def _publish(run: RunDir, model: Recommender, cfg: FitConfig, best_path: Path, best_epoch: int, test: dict) -> None:
    publish_model(run, model, cfg, run.read_config().get("cache"), best_path, best_epoch, test)


def _start_run_dir(run: RunDir, cfg: FitConfig, data: SequenceData, softmax: dict | None = None) -> None:
    run.path.mkdir(parents=True)
    encoder = image_encoder(cfg)
    run.write_config(cfg.record(), data, run_cache_identity(cfg), softmax,
                     encoder_random_init=is_random_init(encoder[1]) if encoder else None)
    run.write_data(data)


def image_encoder(cfg: FitConfig) -> tuple[str, str] | None:
    """(model, pretrained) of the image encoder behind the item tower: the one e2e builds, or the one
    that made the cache a frozen, partial, side or hybrid tower reads; None for the id tower."""
    if cfg.items.kind == "e2e":
        return cfg.items.encoder, cfg.items.pretrained
    if cfg.items.uses_cache and cfg.items.cache:
        try:
            attrs = read_cache_attrs(cfg.items.cache)
        except PixelrecError:
            return None  # an unreadable cache is refused with its own message when the tower is built
        return str(attrs.get("model", "")), str(attrs.get("pretrained", "none"))
    return None


def _data_parallel(model: Recommender, device: torch.device, world: World) -> torch.nn.Module:
    """What computes a step's loss: the model, or with several processes its DDP wrapper (gradients
    all-reduced; frozen encoder blocks, which need no gradient, take no part)."""
    if not world.is_distributed:
        return model
    # forward_sync_buffers=False: buffers (cached embeddings, popularity) are the same on every rank
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def _published_results(run: RunDir, best_path: Path) -> dict | None:
    """The test results of `best_path` when the manifest already publishes it, else None."""
    manifest = run.read_manifest()
    if not manifest or run.path / manifest["checkpoint"] != best_path:
        return None
    return {k: v for k, v in run.read_results().items() if k != "published"}


def _train_epoch(cfg: FitConfig, data: SequenceData, model: Recommender, step_model: torch.nn.Module, optimizer,
                 scaler, windows, run: RunDir, progress: _Progress, device: torch.device, precision: str,
                 world: World, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Train and validate one epoch, then checkpoint (best weights when improved, last.pt always)."""
    epoch, t_epoch = progress.next_epoch, time.time()
    try:
        stats = train_one_epoch(model, windows, optimizer, scaler, epoch=epoch, seed=cfg.train.seed,
                                batch_size=cfg.train.batch_size, device=device, precision=precision,
                                world=world, step_model=step_model)
    except TrainingDiverged as exc:
        raise PixelrecError(f"{cfg.out}: {exc}; try a lower --lr (now {cfg.train.lr:g})") from None
    valid = evaluate_model(model, data, "valid", ks=(10, 20), batch_size=cfg.train.eval_batch_size,
                           world=world)["overall"]
    score = valid[VALID_METRIC]
    improved = score > progress.best_score or (cfg.train.ties == "later" and score == progress.best_score)
    previous_best = run.path / progress.best_path if progress.best_path else None
    if improved:
        best_path = run.best_checkpoint(epoch)
        world.on_main(lambda: run.save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch}))
        progress.best_epoch, progress.best_score, progress.bad_epochs = epoch, score, 0
        progress.best_path = str(best_path.relative_to(run.path))
    else:
        progress.bad_epochs += 1
    progress.history.append({"epoch": epoch, "train_loss": stats.loss, "train_seconds": round(stats.seconds, 3),
                             "seconds": round(time.time() - t_epoch, 3),
                             **{f"valid_{k}": v for k, v in valid.items() if k != "users"}})
    world.on_main(lambda: _checkpoint(run, model, optimizer, epoch, progress, previous_best if improved else None))
    if on_epoch is not None and world.is_main:
        on_epoch(progress.history[-1])
    log(f"epoch {epoch}: loss {stats.loss:.4f}  valid {VALID_METRIC} {score:.4f}"
        f"  recall@10 {valid['recall@10']:.4f}  ({stats.seconds:.1f}s train){'  *' if improved else ''}")


def _checkpoint(run: RunDir, model: Recommender, optimizer, epoch: int, progress: _Progress,
                replaced_best: Path | None) -> None:
    """last.pt and metrics.jsonl after an epoch; a best checkpoint it replaced goes unless published."""
    run.save_checkpoint(run.last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "epoch": epoch, **progress.state()})
    run.write_metrics(progress.history)
    if replaced_best is not None:
        manifest = run.read_manifest()
        if not manifest or run.path / manifest["checkpoint"] != replaced_best:  # the published one stays
            replaced_best.unlink(missing_ok=True)


def _check_resume(run: RunDir, cfg: FitConfig, data: SequenceData, softmax: dict | None = None) -> bool:
    """Whether the run has a finished epoch to continue (False: it starts from the beginning), after
    checking it against `cfg` and `data`; records a changed --epochs / --patience / --device."""
    if not run.last.is_file():
        log(f"{run.path}: no finished epoch to resume from; starting from the beginning")
        return False
    meta = run.read_config()
    if meta["data"]["fingerprint"] != data.fingerprint:
        raise PixelrecError(f"{run.path}: --resume with different data than the run was started on "
                            f"({cfg.interactions} has fingerprint {data.fingerprint[:12]}, the run "
                            f"{meta['data']['fingerprint'][:12]})")
    # through FitConfig.from_dict: settings added since the run started take the values it ran with
    recorded = FitConfig.from_dict(meta["config"]).record()
    if recorded["loss"]["softmax"] == "auto":  # a run from before config.json recorded the softmax's choice
        recorded["loss"].update(softmax=cfg.loss.softmax, negatives=cfg.loss.negatives)
    elif _both_auto(meta.get("softmax"), softmax):  # the rule's choice can differ by device: keep the run's
        cfg.loss.softmax, cfg.loss.negatives = recorded["loss"]["softmax"], recorded["loss"]["negatives"]
    diffs = _config_diff(_comparable(recorded), _comparable(cfg.record()), ignore=RESUMABLE_CHANGES)
    if diffs:
        raise PixelrecError(f"{run.path}: --resume with different settings than the run: {'; '.join(diffs)}")
    if meta.get("cache") != run_cache_identity(cfg):
        raise PixelrecError(f"{run.path}: --resume with a cache ({cfg.items.cache}) whose content is not the one "
                            f"the run started on")
    done = int(run.load_checkpoint(run.last)["epoch"]) + 1
    if cfg.train.epochs < done:
        raise PixelrecError(f"{run.path}: --epochs {cfg.train.epochs} but the run has already trained {done} "
                            f"epochs; give --epochs {done} or more to continue it")
    run.write_config(cfg.record(), data, meta.get("cache"), meta.get("softmax") or softmax)
    return True


def _both_auto(recorded: dict | None, now: dict | None) -> bool:
    """Whether the run's softmax and this resume's were both left to the cost rule (--softmax auto)."""
    return all(isinstance(c, dict) and c.get("decided_by") == "auto" for c in (recorded, now))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Settings with paths made absolute and real, so `./covers` and `covers` compare equal."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for section, key in (("items", "images"), (None, "init_from")):
        holder = out.get(section, {}) if section else out
        if holder.get(key):
            holder[key] = os.path.realpath(holder[key])
    return out


def _config_diff(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, ignore, prefix=f"{path}.")
        elif a != b:
            out.append(f"{path} was {a!r}, now {b!r}")
    return out


def _check_new_target(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to start a new run where one exists (unless overwrite) or over a directory of other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PixelrecError(f"{out}: exists and is not a directory; choose another --out")
    if RunDir(out).exists():
        if not overwrite and not resume:
            raise PixelrecError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                                f"or another --out")
        return
    if any(out.iterdir()):
        raise PixelrecError(f"{out}: exists and is not a pixelrec run directory (it holds other files); "
                            f"choose another --out")


def _promote(staging: Path, out: Path) -> RunDir:
    """Move a new run into place, replacing whatever run was at `out` (its lock is held)."""
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        os.rename(out, replaced)
    os.rename(staging, out)
    shutil.rmtree(replaced, ignore_errors=True)
    log(f"{out}: new run in place after its first epoch")
    return RunDir(out)


def _recover_interrupted_replace(out: Path) -> None:
    """Clean up after a fit killed while replacing or staging a run (the caller holds the lock)."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if not out.exists():
            os.rename(old, out)
            log(f"{out}: restored the run that an interrupted --overwrite was replacing")
        else:
            shutil.rmtree(old, ignore_errors=True)
