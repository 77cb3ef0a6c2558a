"""FM (non-sequential): the user is the sum of the history's item vectors.

The PixelRec reference's FM scores a candidate by the factorisation machine's second-order term over
the fields {history items, candidate}, with no first-order or bias term. The terms between two history
items are the same for every candidate, so the ranking is <sum of the history's item vectors, item
vector>: the user vector here. As every model here sees the last --max-len items, the user is the sum
of the last --max-len history items (the reference: 10).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SequenceConfig


def history_sums(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, d], mask [B, L] -> (sum of the real item vectors up to each position [B, L, d],
    their count [B, L, 1]): a causal running sum, the state at t sees positions <= t only."""
    m = mask[..., None].to(x.dtype)
    return torch.cumsum(x * m, dim=1), torch.cumsum(m, dim=1)


class FM(nn.Module):
    """State at t = sum of the (dropped-out) vectors of the real items at positions <= t."""

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return history_sums(self.drop(x), mask)[0]


def token_macs(cfg: SequenceConfig) -> float:
    """Forward work per window position (losses.sequence_macs): the running sum's d additions."""
    return cfg.dim
