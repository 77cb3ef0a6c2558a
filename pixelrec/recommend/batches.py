"""Training windows and batches: users' training sequences -> left-padded windows of L + 1 items.

A window w of L + 1 items trains L next-item predictions at once: inputs w[:-1], targets w[1:],
each position's state only seeing the inputs up to it (causal encoders). Two ways to cut windows:

- ``sliding`` (our default): windows end at the sequence end and every `stride` items before it,
  so every training transition is a target at least once per epoch, and with stride < L targets
  are seen with different amounts of context.
- ``chunks`` (the PixelRec reference): non-overlapping chunks of L + 1 items; the oldest
  ``len % (L + 1)`` items of a longer sequence are dropped, as the reference code does.
"""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
import torch

from ..data.sequences import SequenceData

WindowMode = Literal["sliding", "chunks"]


def window_bounds(length: int, max_len: int, mode: WindowMode, stride: int) -> list[tuple[int, int]]:
    """[start, end) slices of a training sequence of `length` items (windows hold <= max_len + 1 items)."""
    span = max_len + 1
    if length < 2:
        return []  # no transition to learn
    if length <= span:
        return [(0, length)]
    if mode == "chunks":
        first = length % span
        return [(s, s + span) for s in range(first, length, span)]
    ends = list(range(length, span - 1, -stride))
    if ends[-1] != span:
        ends.append(span)  # make sure the oldest transitions are targets too
    return [(e - span, e) for e in reversed(ends)]


def training_windows(data: SequenceData, max_len: int, mode: WindowMode = "sliding", stride: int = 0) -> np.ndarray:
    """[W, max_len + 1] int32 left-padded windows of every user's training sequence."""
    stride = stride or max_len
    rows: list[np.ndarray] = []
    for u in range(data.num_users):
        seq = data.train_sequence(u)
        for s, e in window_bounds(len(seq), max_len, mode, stride):
            rows.append(seq[s:e])
    out = np.zeros((len(rows), max_len + 1), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, max_len + 1 - len(r) :] = r
    return out


def left_pad(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """[B, max_len] int64: the last max_len items of each history, left-padded with 0."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[i, max_len - len(h) :] = h
    return out


def iterate_batches(
    windows: np.ndarray, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Shuffled batches of windows as int64 tensors [B, L + 1]."""
    order = torch.randperm(len(windows), generator=generator).numpy()
    for i in range(0, len(order), batch_size):
        yield torch.from_numpy(windows[order[i : i + batch_size]].astype(np.int64))


def sample_negatives(
    seq: torch.Tensor, candidates: int | torch.Tensor, generator: torch.Generator, rounds: int = 10
) -> torch.Tensor:
    """One uniform negative per target position [B, L], never among the window's items (PixelRec BPR).

    `candidates`: the item indices negatives are drawn from (training uses the items that have
    training interactions: items first seen at test time did not exist yet), or an int N for 1..N.
    Draws uniformly, redraws clashes a few times, and samples any remaining clash exactly from the
    candidates outside its window (only a window holding every candidate keeps a clash).
    """
    if isinstance(candidates, int):
        candidates = torch.arange(1, candidates + 1)
    B, L1 = seq.shape
    draw = lambda n: candidates[torch.randint(0, len(candidates), (n,), generator=generator)]  # noqa: E731
    neg = draw(B * (L1 - 1)).view(B, L1 - 1)
    for _ in range(rounds):
        clash = (neg[:, :, None] == seq[:, None, :]).any(-1)  # [B, L]
        if not clash.any():
            return neg
        neg[clash] = draw(int(clash.sum()))
    clash = (neg[:, :, None] == seq[:, None, :]).any(-1)
    if clash.any():
        where = clash.nonzero()  # [C, 2] (row, position)
        allowed = ~(candidates[None, None, :] == seq[where[:, 0]][:, :, None]).any(1)  # [C, n_candidates]
        ok = allowed.any(1)
        if ok.any():
            pick = torch.multinomial(allowed[ok].float(), 1, generator=generator).squeeze(1)
            neg[where[ok, 0], where[ok, 1]] = candidates[pick]
    return neg
