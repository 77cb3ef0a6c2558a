"""One training epoch of a Recommender: shuffled windows -> optimiser steps (the library half of fit).

Every epoch draws its randomness (batch order, sampled negatives, dropout) from generators seeded
by (seed, epoch) alone, so an epoch computes the same thing whether or not the process was
restarted before it: the basis of `fit --resume`'s "resumed equals uninterrupted" guarantee.

Distributed (several processes, `World`): every process draws the same global batches and
negatives from the same generator and trains its contiguous share of each batch's windows through
DistributedDataParallel; the loss is normalised by the global batch's trained positions, so W
processes compute the gradient one process computes with the same global batch. Dropout is seeded
per process. The run-level loop around this (validation, early stopping, checkpoints) is
`pixelrec.runs.fit`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import World
from ..runtime import autocast_for, progress
from .batches import Windows, iterate_user_batches, sample_negatives
from .model import BatchShare, Recommender


@dataclass
class EpochStats:
    loss: float  # mean training loss over the epoch's steps (of the whole global batches)
    steps: int
    seconds: float


class TrainingDiverged(ArithmeticError):
    """The training loss became NaN or infinite (the learning rate is too high for this model)."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"training diverged at epoch {epoch}, step {step} (loss {loss})")


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Seed torch's global RNG (dropout; per process) and return the generator of batch order and
    negatives for one epoch (the same in every process)."""
    torch.manual_seed(seed * 100_003 + epoch + rank * 7_919_317)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_one_epoch(model: Recommender, windows: Windows, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, epoch: int, seed: int, batch_size: int,
                    device: torch.device, precision: str = "auto", world: World = World(),
                    step_model: nn.Module | None = None) -> EpochStats:
    """One pass over `windows` in a seeded shuffled order; raises TrainingDiverged on a NaN/inf loss.

    `batch_size` is the global batch; `step_model` is what computes a step's loss (the model, or
    its DistributedDataParallel wrapper when `world` has several processes).
    """
    started = time.time()
    gen = epoch_generator(seed, epoch, world.rank)
    model.train()
    step_model = model if step_model is None else step_model
    bpr = model.loss_cfg.loss == "bpr"
    total, steps = 0.0, 0
    bar = progress(iterate_user_batches(windows, batch_size, gen), total=math.ceil(len(windows) / batch_size),
                   desc=f"epoch {epoch}")
    for seq, trained, users in bar:
        hidden = model.draw_hidden(seq, trained, gen)  # cloze: [B, L + 1] the slots to hide; else None
        width = None if hidden is None else seq.shape[1]  # cloze: a target at every slot
        neg = sample_negatives(seq, model.known_items.cpu(), gen, width=width) if bpr else None  # the global batch's
        uniform = model.draw_uniform_negatives(gen)
        with autocast_for(device, precision):
            loss = _step_loss(model, step_model, seq, neg, uniform, trained, device, world, users, hidden)
        value = _global_value(loss, world)
        if not math.isfinite(value):
            raise TrainingDiverged(epoch, steps, value)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a no-op scale unless autocast runs in float16
        scaler.step(optimizer)
        scaler.update()
        total, steps = total + value, steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}")
    return EpochStats(loss=total / max(steps, 1), steps=steps, seconds=time.time() - started)


def _step_loss(model: Recommender, step_model: nn.Module, seq: torch.Tensor, neg: torch.Tensor | None,
               uniform: torch.Tensor | None, trained: torch.Tensor, device: torch.device, world: World,
               users: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """This process's loss of one global batch (the whole batch in a single process); `users` [B]: the
    windows' user indices, passed only to a model whose encoder reads them (MF, VBPR); `hidden`: the
    cloze objective's hidden slots (`Recommender.draw_hidden`)."""
    users = users if getattr(model.encoder, "reads_users", False) else None
    if not world.is_distributed:
        extra = {} if users is None else {"users": users.to(device)}
        if hidden is not None:
            extra["hidden"] = hidden.to(device)
        return step_model(seq.to(device), None if neg is None else neg.to(device), None, trained, uniform=uniform,
                          **extra)
    share = BatchShare(seq=seq, trained=trained, neg=neg, world=world, hidden=hidden)
    lo, hi = world.span(len(seq))
    trained = trained.clone()
    if hi == lo:  # more processes than windows in this (last) batch: take part with one window that trains nothing
        lo, hi = 0, 1
        trained[0] = 0
        if hidden is not None:
            hidden = hidden.clone()
            hidden[0] = False
    part = lambda t: None if t is None else t[lo:hi].to(device)  # noqa: E731
    extra = {} if users is None else {"users": part(users)}
    if hidden is not None:
        extra["hidden"] = part(hidden)
    return step_model(part(seq), part(neg), None, part(trained), uniform=uniform, share=share, **extra)


def _global_value(loss: torch.Tensor, world: World) -> float:
    """The step's loss of the whole global batch (each process holds W x its part; DDP averages)."""
    if not world.is_distributed:
        return loss.item()
    return world.all_reduce_sum(loss.detach().float().reshape(1)).item() / world.size
