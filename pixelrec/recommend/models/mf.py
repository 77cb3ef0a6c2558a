"""MF (non-sequential): a learned vector per training user dotted with the item vector (BPR-MF).

Training pairs are the user's training interactions: every position of a training window trains its
target with the window's user vector (the history is not read), so each training interaction after
the user's first is one (user, item) pair per epoch; the first has no position before it and is not
trained. Users without a vector (not in training: `retrieve --history`, `serve` with a history) are
folded in from their history with the item vectors fixed (recommend/foldin.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SequenceConfig


class MF(nn.Module):
    reads_users = True  # Recommender passes the user indices [B]
    fixed_tail: tuple[float, ...] = ()  # coordinates of the user vector that are constants (none)

    def __init__(self, cfg: SequenceConfig, num_users: int):
        super().__init__()
        self.user_embedding = nn.Embedding(max(num_users, 1), cfg.dim - len(self.fixed_tail))
        nn.init.normal_(self.user_embedding.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def num_users(self) -> int:
        return self.user_embedding.num_embeddings

    def complete(self, free: torch.Tensor) -> torch.Tensor:
        """The learned (or folded-in) coordinates [..., d - t] -> the user vector [..., d] (the fixed tail appended)."""
        if not self.fixed_tail:
            return free
        tail = free.new_tensor(self.fixed_tail).expand(*free.shape[:-1], len(self.fixed_tail))
        return torch.cat([free, tail], -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """The user's vector at every position [B, L, d] (the history x, mask is not read)."""
        if users is None:
            raise ValueError("MF needs the user index of every window")
        vec = self.complete(self.drop(self.user_embedding(users)))  # [B, d]
        return vec[:, None].expand(-1, x.shape[1], -1)


def token_macs(cfg: SequenceConfig) -> float:
    """Forward work per window position (losses.sequence_macs): none, the user's vector is looked up
    (VBPR's visual projection is item-tower work, counted with the tower)."""
    return 0.0
