"""`pixelrec fit`: the run-level training loop with per-epoch validation, early stopping, checkpoints
and resume, writing a run directory (`runs.rundir`).

Resume contract: every epoch draws its randomness from generators seeded by (seed, epoch)
(`recommend.train`), and the model/optimiser/early-stopping state is checkpointed atomically after
every finished epoch. A run killed at any point and restarted with `resume=True` continues after
the last finished epoch and ends with the same weights and metrics as an uninterrupted run (on the
same device).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
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
from ..runtime import grad_scaler_for, log, resolve_device, seed_everything, write_json
from .item_index import build_run_index
from .rundir import RunDir, run_cache_identity
from .transfer import init_from_run

VALID_METRIC = "ndcg@10"


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    valid: dict[str, float]
    test: dict[str, Any]
    seconds: float
    seconds_per_epoch: float


def fit(cfg: FitConfig, resume: bool = False, overwrite: bool = False) -> FitResult:
    cfg.validate()
    t0 = time.time()
    run = RunDir(cfg.out)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    data = load_sequences(cfg.interactions, cfg.train.min_interactions)
    log(f"data: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
        f" ({data.dropped_users} users with < {cfg.train.min_interactions} interactions dropped,"
        f" {data.dropped_interactions} rows)")
    # Build (and transfer) before touching RUN_DIR, so a refused config leaves nothing behind.
    model = build_recommender(cfg, data).to(device)
    if cfg.init_from and not (resume and run.last.is_file()):
        init_from_run(model, cfg)
    state = _prepare_run_dir(run, cfg, data, resume, overwrite)
    optimizer = build_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    best = {"epoch": -1, "score": -math.inf}
    bad_epochs, start = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        start = state["epoch"] + 1
        log(f"resuming {run.path} after epoch {state['epoch']} (best valid {VALID_METRIC} "
            f"{best['score']:.4f} at epoch {best['epoch']})")

    windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride)
    if len(windows) == 0:
        raise PixelrecError(f"{cfg.interactions}: no training sequence has two items; nothing to train on")
    precision = "auto" if cfg.train.amp else "fp32"
    scaler = grad_scaler_for(device, precision)
    stopped = bad_epochs >= cfg.train.patience
    for epoch in range(start, cfg.train.epochs):
        if stopped:
            break
        t_epoch = time.time()
        try:
            stats = train_one_epoch(model, windows, optimizer, scaler, epoch=epoch, seed=cfg.train.seed,
                                    batch_size=cfg.train.batch_size, device=device, precision=precision)
        except TrainingDiverged as exc:
            raise PixelrecError(f"{run.path}: {exc}; try a lower --lr (now {cfg.train.lr:g})") from None
        valid = evaluate_model(model, data, "valid", ks=(10, 20), batch_size=cfg.train.eval_batch_size)["overall"]
        score = valid[VALID_METRIC]
        improved = score > best["score"]
        if improved:
            best = {"epoch": epoch, "score": score}
            bad_epochs = 0
            run.save_checkpoint(run.best, {"model": model.state_dict(), "epoch": epoch})
        else:
            bad_epochs += 1
        history.append({"epoch": epoch, "train_loss": stats.loss, "train_seconds": round(stats.seconds, 3),
                        "seconds": round(time.time() - t_epoch, 3),
                        **{f"valid_{k}": v for k, v in valid.items() if k != "users"}})
        run.save_checkpoint(run.last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "epoch": epoch, "history": history, "best": best, "bad_epochs": bad_epochs})
        run.write_metrics(history)
        log(f"epoch {epoch}: loss {stats.loss:.4f}  valid {VALID_METRIC} {score:.4f}"
            f"  recall@10 {valid['recall@10']:.4f}  ({stats.seconds:.1f}s train){'  *' if improved else ''}")
        stopped = bad_epochs >= cfg.train.patience

    run.write_metrics(history)  # also after a resume that had nothing left to train
    if best["epoch"] < 0:
        raise PixelrecError(f"{run.path}: no epoch finished (--epochs {cfg.train.epochs})")
    model.load_state_dict(run.load_checkpoint(run.best, device)["model"])
    test = finalize_run(model, data, run, cfg)
    train_times = [h["train_seconds"] for h in history]
    result = FitResult(run.path, best["epoch"], len(history),
                       valid={k[6:]: v for k, v in history[best["epoch"]].items() if k.startswith("valid_")},
                       test=test, seconds=time.time() - t0, seconds_per_epoch=float(np.mean(train_times)))
    log(f"best epoch {best['epoch']}: test ndcg@10 {test['overall']['ndcg@10']:.4f} "
        f"recall@10 {test['overall']['recall@10']:.4f}")
    return result


def _prepare_run_dir(run: RunDir, cfg: FitConfig, data: SequenceData, resume: bool, overwrite: bool) -> dict | None:
    """Write config + data for a new run, or check them and return the last checkpoint on resume."""
    if resume:
        if not run.last.is_file():
            if run.exists():
                log(f"{run.path}: no finished epoch to resume from; starting from the beginning")
            run.write_config(cfg.to_dict(), data, run_cache_identity(cfg))
            run.write_data(data)
            return None
        meta = run.read_config()
        if meta["data"]["fingerprint"] != data.fingerprint:
            raise PixelrecError(f"{run.path}: --resume with different data than the run was started on "
                                f"({cfg.interactions} has fingerprint {data.fingerprint[:12]}, the run "
                                f"{meta['data']['fingerprint'][:12]})")
        diffs = _config_diff(meta["config"], cfg.to_dict(), ignore={"train.epochs", "train.patience", "train.device"})
        if diffs:
            raise PixelrecError(f"{run.path}: --resume with different settings than the run: {'; '.join(diffs)}")
        state = run.load_checkpoint(run.last)
        if meta.get("cache") != run_cache_identity(cfg):
            raise PixelrecError(f"{run.path}: --resume with a cache ({cfg.items.cache}) that is not the one the run started on")
        run.write_config(cfg.to_dict(), data, meta.get("cache"))  # records a changed --epochs / --patience / --device
        return state
    if run.exists() and not overwrite:
        raise PixelrecError(f"{run.path} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out")
    if overwrite:
        for p in (run.last, run.best, run.metrics, run.results):
            p.unlink(missing_ok=True)
        shutil.rmtree(run.index_dir, ignore_errors=True)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg.to_dict(), data, run_cache_identity(cfg))
    run.write_data(data)
    return None


def _config_diff(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in ignore or path in ("out", "interactions"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, ignore, prefix=f"{path}.")
        elif a != b:
            out.append(f"{path} was {a!r}, now {b!r}")
    return out


def finalize_run(model: Recommender, data: SequenceData, run: RunDir, cfg: FitConfig) -> dict:
    """Index the final item vectors in the run dir and write the test metrics (results.json)."""
    model.eval()
    build_run_index(model, run)
    report = evaluate_model(model, data, "test", ks=(5, 10, 20), batch_size=cfg.train.eval_batch_size,
                            cold_threshold=cfg.train.cold_threshold, tower_kind=cfg.items.kind)
    write_json(run.results, report)
    return report
