"""Training windows and batches: users' training sequences -> left-padded windows of L + 1 items.

A window w of L + 1 items holds L next-item predictions: inputs w[:-1], targets w[1:], each
position's state only seeing the inputs up to it (causal encoders). A window trains its newest
`trained` targets (the others are only context), so one forward pass trains several targets. Two
ways to cut windows:

- ``sliding`` (our default): windows end at the sequence end and every `stride` items before it,
  each training its newest `stride` targets; the oldest window takes what is left. Every training
  transition is trained exactly once per epoch, with at least L - stride items of context where
  the sequence has them. stride = 1 is RecBole's one-sample-per-prefix; larger strides train
  more targets per forward pass (cheaper) with less context for some of them.
- ``overlapping`` (GRU4Rec's default): windows end every `stride` items as in ``sliding`` but
  train every target they hold, so with stride < L each transition is trained more than once, with
  short and long context. Measured better for GRU4Rec on ML-100K; SASRec does better with ``sliding``.
- ``chunks`` (the PixelRec reference): non-overlapping chunks of L + 1 items, every target trained;
  the oldest ``len % (L + 1)`` items of a longer sequence are dropped, as the reference code does.
- ``prefixes`` (prefix -> next; the PixelRec code's AUGSEQ): one window per prefix of two or more
  items, training only its newest target, i.e. only the window's last position. The one cut that
  suits models whose states are not causal (``prefix`` objective, models/registry.py).

Under the ``cloze`` objective (BERT4Rec) a window is a sequence of up to L + 1 items of which
`cloze_masks` hides some; every item may be a target, so it takes ``chunks`` or ``overlapping``
windows (config refuses the cuts made for next-item targets). The ``context`` objective (FM / DSSM
with `--context window`) takes the same windows and trains every item of them (`context_slots`).

A one-item training sequence has no transition and gives no window, unless `keep_single` asks for
it as a window that trains nothing (the PixelRec code keeps it: with the loss averaged over a
batch's sequences it still counts in the average, `LossConfig.mean_over`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch

from ..data.sequences import SequenceData

WindowMode = Literal["sliding", "overlapping", "chunks", "prefixes"]


@dataclass
class Windows:
    """items [W, L + 1] int32 left-padded windows; trained [W] int32: how many newest targets each trains;
    users [W] int32: the user index each window comes from (models with a vector per user, e.g. MF)."""

    items: np.ndarray
    trained: np.ndarray
    users: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)


def window_bounds(length: int, max_len: int, mode: WindowMode, stride: int, keep_single: bool = False
                  ) -> list[tuple[int, int, int]]:
    """(start, end, trained) of the windows of a training sequence of `length` items, oldest first.

    A window is the slice [start, end) (at most max_len + 1 items) and trains its newest `trained`
    targets, i.e. the transitions into items end - trained .. end - 1.
    """
    span = max_len + 1
    if not 1 <= stride <= max_len and mode not in ("chunks", "prefixes"):
        raise ValueError(f"stride must be in [1, max_len] (got {stride}, max_len {max_len})")
    if length < 2:
        return [(0, 1, 0)] if keep_single and length == 1 else []  # no transition to learn
    if mode == "prefixes":
        return [(max(0, end - span), end, 1) for end in range(2, length + 1)]
    if length <= span:
        return [(0, length, length - 1)]  # one window holds every transition, in every mode
    if mode == "chunks":
        return [(s, s + span, max_len) for s in range(length % span, length, span)]
    if mode == "overlapping":
        ends = list(range(length, span - 1, -stride))
        if ends[-1] != span:
            ends.append(span)  # the oldest transitions are targets too
        return [(e - span, e, max_len) for e in reversed(ends)]
    out, end = [], length
    while end > span:
        out.append((end - span, end, stride))
        end -= stride
    out.append((0, end, end - 1))  # the oldest window: every target not trained yet (end >= 2)
    return out[::-1]


def training_windows(data: SequenceData, max_len: int, mode: WindowMode = "sliding", stride: int = 0,
                     keep_single: bool = False) -> Windows:
    """Every user's training sequence cut into left-padded windows (see the module docstring)."""
    stride = stride or max_len
    rows: list[np.ndarray] = []
    trained: list[int] = []
    users: list[int] = []
    for u in range(data.num_users):
        seq = data.train_sequence(u)
        for s, e, k in window_bounds(len(seq), max_len, mode, stride, keep_single):
            rows.append(seq[s:e])
            trained.append(k)
            users.append(u)
    out = np.zeros((len(rows), max_len + 1), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, max_len + 1 - len(r) :] = r
    return Windows(out, np.asarray(trained, dtype=np.int32), np.asarray(users, dtype=np.int32))


def left_pad(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """[B, max_len] int64: the last max_len items of each history, left-padded with 0."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[i, max_len - len(h) :] = h
    return out


def iterate_batches(
    windows: Windows, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches: (items [B, L + 1] int64, trained [B] int64) of the windows."""
    for items, trained, _ in iterate_user_batches(windows, batch_size, generator):
        yield items, trained


def iterate_user_batches(
    windows: Windows, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """`iterate_batches` (the same order for the same generator) with each window's user index [B]
    int64 as a third member (None when the windows carry no users)."""
    order = torch.randperm(len(windows), generator=generator).numpy()
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        users = None if windows.users is None else torch.from_numpy(windows.users[rows].astype(np.int64))
        yield (torch.from_numpy(windows.items[rows].astype(np.int64)),
               torch.from_numpy(windows.trained[rows].astype(np.int64)), users)


def cloze_masks(seq: torch.Tensor, trained: torch.Tensor, ratio: float, last_share: float,
                generator: torch.Generator) -> torch.Tensor:
    """[B, W] bool: the slots of windows seq [B, W] that a cloze step hides (BERT4Rec's training).

    A window with a target (trained > 0) hides each of its items with probability `ratio` and at
    least one (where the draw hid none, the item with the smallest draw, i.e. a uniformly chosen
    one); a `last_share` of the windows hides only its last item instead, as a user vector is
    computed at inference (RecBole after its issue #1530). Padding is never hidden, and a window
    that trains nothing (`keep_single`) hides nothing. Every draw comes from `generator`.
    """
    B, W = seq.shape
    real = (seq != 0) & (trained > 0)[:, None].to(seq.device)
    last_only = (torch.rand(B, generator=generator) < last_share).to(seq.device)
    draw = torch.rand(B, W, generator=generator).to(seq.device)
    hidden = (draw < ratio) & real
    none = ~hidden.any(1) & real.any(1)
    first = draw.masked_fill(~real, 2.0).argmin(1)  # the real slot with the smallest draw
    hidden[none, first[none]] = True
    hidden[last_only] = False
    hidden[:, -1] |= last_only & real[:, -1]
    return hidden


def context_slots(seq: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """[B, W] bool: the slots a ``context`` step trains (FM / DSSM with `--context window`, the PixelRec
    code's chunks): every real item of a window that trains something (trained > 0) and holds another
    real item to predict it from."""
    real = (seq != 0) & (trained > 0)[:, None].to(seq.device)
    return real & (real.sum(1, keepdim=True) >= 2)


def sample_negatives(
    seq: torch.Tensor, candidates: int | torch.Tensor, generator: torch.Generator, rounds: int = 10,
    width: int | None = None,
) -> torch.Tensor:
    """One uniform negative per target position [B, L] (or [B, width]: the cloze objective has a target
    at every slot of a window, width = L + 1), never among the window's items (PixelRec BPR).

    `candidates`: the item indices negatives are drawn from (training uses the items that have
    training interactions: items first seen at test time did not exist yet), or an int N for 1..N.
    Draws uniformly, redraws clashes a few times, and samples any remaining clash exactly from the
    candidates outside its window (only a window holding every candidate keeps a clash).
    """
    if isinstance(candidates, int):
        candidates = torch.arange(1, candidates + 1)
    B, L1 = seq.shape
    draw = lambda n: candidates[torch.randint(0, len(candidates), (n,), generator=generator)]  # noqa: E731
    n = L1 - 1 if width is None else width
    neg = draw(B * n).view(B, n)
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
