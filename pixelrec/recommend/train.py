"""One training epoch of a Recommender: shuffled windows -> optimiser steps (the library half of fit).

Every epoch draws its randomness (batch order, sampled negatives, dropout) from generators seeded
by (seed, epoch) alone, so an epoch computes the same thing whether or not the process was
restarted before it: the basis of `fit --resume`'s "resumed equals uninterrupted" guarantee.
The run-level loop around it (validation, early stopping, checkpoints) is `pixelrec.runs.fit`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..runtime import autocast_for, grad_scaler_for, progress
from .batches import Windows, iterate_batches, sample_negatives
from .model import Recommender


@dataclass
class EpochStats:
    loss: float  # mean training loss over the epoch's steps
    steps: int
    seconds: float


class TrainingDiverged(ArithmeticError):
    """The training loss became NaN or infinite (the learning rate is too high for this model)."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"training diverged at epoch {epoch}, step {step} (loss {loss})")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Seed torch's global RNG (dropout) and return the generator of batch order and negatives for one epoch."""
    torch.manual_seed(seed * 100_003 + epoch)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_one_epoch(model: Recommender, windows: Windows, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, epoch: int, seed: int, batch_size: int,
                    device: torch.device, precision: str = "auto") -> EpochStats:
    """One pass over `windows` in a seeded shuffled order; raises TrainingDiverged on a NaN/inf loss."""
    started = time.time()
    gen = epoch_generator(seed, epoch)
    model.train()
    bpr = model.loss_cfg.loss == "bpr"
    total, steps = 0.0, 0
    bar = progress(iterate_batches(windows, batch_size, gen), total=math.ceil(len(windows) / batch_size),
                   desc=f"epoch {epoch}")
    for seq, trained in bar:
        neg = sample_negatives(seq, model.known_items.cpu(), gen) if bpr else None
        with autocast_for(device, precision):
            loss = model.training_loss(seq.to(device), None if neg is None else neg.to(device), gen, trained)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(epoch, steps, value)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a no-op scale unless autocast runs in float16
        scaler.step(optimizer)
        scaler.update()
        total, steps = total + value, steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}")
    return EpochStats(loss=total / max(steps, 1), steps=steps, seconds=time.time() - started)

