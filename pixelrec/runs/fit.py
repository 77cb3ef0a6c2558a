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
from typing import Any

import numpy as np
import torch

from ..data.sequences import SequenceData, load_sequences
from ..errors import PixelrecError
from ..index.evaluate import evaluate_model
from ..recommend.batches import training_windows
from ..recommend.build import build_optimizer, build_recommender
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.train import TrainingDiverged, train_one_epoch
from ..runtime import grad_scaler_for, log, resolve_device, seed_everything
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
        return {"history": self.history, "bad_epochs": self.bad_epochs,
                "best": {"epoch": self.best_epoch, "score": self.best_score, "path": self.best_path}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Progress":
        best = state["best"]
        return cls(list(state["history"]), int(best["epoch"]), float(best["score"]), best.get("path"),
                   int(state["bad_epochs"]))


def fit(cfg: FitConfig, resume: bool = False, overwrite: bool = False) -> FitResult:
    """Train the model `cfg` describes into the run directory `cfg.out` (see the module doc)."""
    cfg.validate()
    if resume and overwrite:
        raise PixelrecError("--resume continues the run in --out and --overwrite replaces it: give only one")
    t0 = time.time()
    out = Path(cfg.out)
    device = resolve_device(cfg.train.device)
    with RunDir(out).lock():
        _recover_interrupted_replace(out)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        data = load_sequences(cfg.interactions, cfg.train.min_interactions)
        log(f"data: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
            f" ({data.dropped_users} users with < {cfg.train.min_interactions} interactions dropped,"
            f" {data.dropped_interactions} rows)")
        model = build_recommender(cfg, data).to(device)
        state = _resume_state(RunDir(out), cfg, data) if resume else None
        if state is None:
            _check_new_target(out, overwrite, resume)
            if cfg.init_from:
                init_from_run(model, cfg)
            staging = out.parent / f".{out.name}.staging-{os.getpid()}"
            try:
                return _train(cfg, data, model, RunDir(staging), None, device, t0, target=out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already once promoted
        return _train(cfg, data, model, RunDir(out), state, device, t0, target=out)


def _train(cfg: FitConfig, data: SequenceData, model: Recommender, run: RunDir, state: dict | None,
           device: torch.device, t0: float, target: Path) -> FitResult:
    optimizer = build_optimizer(model, cfg)
    progress = _Progress()
    if state is None:
        run.path.mkdir(parents=True)
        run.write_config(cfg.to_dict(), data, run_cache_identity(cfg))
        run.write_data(data)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = _Progress.from_state(state)
        log(f"resuming {run.path} after epoch {progress.next_epoch - 1} (best valid {VALID_METRIC} "
            f"{progress.best_score:.4f} at epoch {progress.best_epoch})")

    windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride)
    if len(windows) == 0:
        raise PixelrecError(f"{cfg.interactions}: no training sequence has two items; nothing to train on")
    precision = "auto" if cfg.train.amp else "fp32"
    scaler = grad_scaler_for(device, precision)
    trained_now = 0
    while progress.next_epoch < cfg.train.epochs and progress.bad_epochs < cfg.train.patience:
        _train_epoch(cfg, data, model, optimizer, scaler, windows, run, progress, device, precision)
        trained_now += 1
        if run.path != target:  # a new run: in place as soon as it has a first finished epoch
            run = _promote(run.path, target)

    run.write_metrics(progress.history)  # also after a resume that had nothing left to train
    if progress.best_epoch < 0:
        raise PixelrecError(f"{target}: no epoch finished (--epochs {cfg.train.epochs})")
    best_path = run.path / progress.best_path
    model.load_state_dict(run.load_checkpoint(best_path, device)["model"])
    manifest = run.read_manifest()
    if trained_now == 0 and manifest and run.path / manifest["checkpoint"] == best_path:
        log(f"{run.path}: already finished and published (best epoch {progress.best_epoch}); nothing to do")
        test = {k: v for k, v in run.read_results().items() if k != "published"}
    else:
        model.eval()
        test = evaluate_model(model, data, "test", ks=(5, 10, 20), batch_size=cfg.train.eval_batch_size,
                              cold_threshold=cfg.train.cold_threshold, tower_kind=cfg.items.kind)
        publish_model(run, model, cfg, run.read_config().get("cache"), best_path, progress.best_epoch, test)
    train_times = [h["train_seconds"] for h in progress.history]
    best_row = progress.history[progress.best_epoch]
    result = FitResult(run.path, progress.best_epoch, len(progress.history),
                       valid={k[6:]: v for k, v in best_row.items() if k.startswith("valid_")}, test=test,
                       seconds=time.time() - t0, seconds_per_epoch=float(np.mean(train_times)))
    log(f"best epoch {progress.best_epoch}: test ndcg@10 {test['overall']['ndcg@10']:.4f} "
        f"recall@10 {test['overall']['recall@10']:.4f}")
    return result


def _train_epoch(cfg: FitConfig, data: SequenceData, model: Recommender, optimizer, scaler, windows,
                 run: RunDir, progress: _Progress, device: torch.device, precision: str) -> None:
    """Train and validate one epoch, then checkpoint (best weights when improved, last.pt always)."""
    epoch, t_epoch = progress.next_epoch, time.time()
    try:
        stats = train_one_epoch(model, windows, optimizer, scaler, epoch=epoch, seed=cfg.train.seed,
                                batch_size=cfg.train.batch_size, device=device, precision=precision)
    except TrainingDiverged as exc:
        raise PixelrecError(f"{cfg.out}: {exc}; try a lower --lr (now {cfg.train.lr:g})") from None
    valid = evaluate_model(model, data, "valid", ks=(10, 20), batch_size=cfg.train.eval_batch_size)["overall"]
    score = valid[VALID_METRIC]
    improved = score > progress.best_score
    previous_best = run.path / progress.best_path if progress.best_path else None
    if improved:
        best_path = run.best_checkpoint(epoch)
        run.save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch})
        progress.best_epoch, progress.best_score, progress.bad_epochs = epoch, score, 0
        progress.best_path = str(best_path.relative_to(run.path))
    else:
        progress.bad_epochs += 1
    progress.history.append({"epoch": epoch, "train_loss": stats.loss, "train_seconds": round(stats.seconds, 3),
                             "seconds": round(time.time() - t_epoch, 3),
                             **{f"valid_{k}": v for k, v in valid.items() if k != "users"}})
    run.save_checkpoint(run.last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "epoch": epoch, **progress.state()})
    run.write_metrics(progress.history)
    if improved and previous_best is not None:
        manifest = run.read_manifest()
        if not manifest or run.path / manifest["checkpoint"] != previous_best:  # the published one stays
            previous_best.unlink(missing_ok=True)
    log(f"epoch {epoch}: loss {stats.loss:.4f}  valid {VALID_METRIC} {score:.4f}"
        f"  recall@10 {valid['recall@10']:.4f}  ({stats.seconds:.1f}s train){'  *' if improved else ''}")


def _resume_state(run: RunDir, cfg: FitConfig, data: SequenceData) -> dict | None:
    """The last checkpoint of the run to continue, checked against `cfg` and `data`; None when the
    run has no finished epoch (it then starts from the beginning)."""
    if not run.last.is_file():
        log(f"{run.path}: no finished epoch to resume from; starting from the beginning")
        return None
    meta = run.read_config()
    if meta["data"]["fingerprint"] != data.fingerprint:
        raise PixelrecError(f"{run.path}: --resume with different data than the run was started on "
                            f"({cfg.interactions} has fingerprint {data.fingerprint[:12]}, the run "
                            f"{meta['data']['fingerprint'][:12]})")
    diffs = _config_diff(_comparable(meta["config"]), _comparable(cfg.to_dict()), ignore=RESUMABLE_CHANGES)
    if diffs:
        raise PixelrecError(f"{run.path}: --resume with different settings than the run: {'; '.join(diffs)}")
    if meta.get("cache") != run_cache_identity(cfg):
        raise PixelrecError(f"{run.path}: --resume with a cache ({cfg.items.cache}) whose content is not the one "
                            f"the run started on")
    state = run.load_checkpoint(run.last)
    done = int(state["epoch"]) + 1
    if cfg.train.epochs < done:
        raise PixelrecError(f"{run.path}: --epochs {cfg.train.epochs} but the run has already trained {done} "
                            f"epochs; give --epochs {done} or more to continue it")
    run.write_config(cfg.to_dict(), data, meta.get("cache"))  # records a changed --epochs / --patience / --device
    return state


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
