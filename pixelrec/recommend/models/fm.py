"""FM (non-sequential): the user is the sum of the history's item vectors.

The PixelRec reference's FM scores a candidate by the factorisation machine's second-order term over
the fields {history items, candidate}, with no first-order or bias term. The terms between two history
items are the same for every candidate, so the ranking is <sum of the history's item vectors, item
vector>: the user vector here. As every model here sees the last --max-len items, the user is the sum
of the last --max-len history items (the reference: 10).

Training (`--context`): ``causal`` (default) trains each item of a window from the items before it,
the state a user is served; ``window`` (`--preset pixelrec`) trains each item from every other item
of its window, before and after it, as the reference's chunks do (the ``context`` objective,
models/registry.py: `Recommender.draw_hidden` marks every real slot and passes it as `targets`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SequenceConfig


def history_sums(x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, d], mask [B, L] -> (sum of the real item vectors [B, L, d], their count [B, L, 1]) that
    the state at each position sees: a causal running sum (positions <= t); with targets [B, L] (the
    ``context`` objective's trained slots) the whole window but the position itself."""
    m = mask[..., None].to(x.dtype)
    if targets is None:
        return torch.cumsum(x * m, dim=1), torch.cumsum(m, dim=1)
    total, count = (x * m).sum(1, keepdim=True), m.sum(1, keepdim=True)  # [B, 1, d], [B, 1, 1]
    return total - x * m, count - m


def context_objective(cfg: SequenceConfig) -> str:
    """The training objective of FM / DSSM under cfg's --context (models/registry.py)."""
    return "context" if cfg.context == "window" else "causal"


class FM(nn.Module):
    """State at t = sum of the (dropped-out) vectors of the real items at positions <= t (training with
    --context window: of every real item of the window but t)."""

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.objective = context_objective(cfg)  # Recommender.draw_hidden reads it

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return history_sums(self.drop(x), mask, targets)[0]


def token_macs(cfg: SequenceConfig) -> float:
    """Forward work per window position (losses.sequence_macs): the running sum's d additions."""
    return cfg.dim
