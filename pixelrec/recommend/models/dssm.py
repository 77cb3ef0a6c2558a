"""DSSM (non-sequential): the user is the mean of the history's item vectors, through an optional MLP.

The PixelRec reference's DSSM is a two-tower model whose user tower averages the history's item
embeddings (the item tower's own table) and whose MLPs are empty (`mlp_hidden_size: []`). Here the
item tower is pixelrec's item tower (id, frozen, partial, e2e, hybrid) unchanged, and `--dssm-mlp`
adds an MLP on the user side only: an MLP on the item side would sit inside every item tower (and
the stored item vectors), which the towers do not offer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SequenceConfig, parse_sizes
from .fm import context_objective, history_sums


class DSSM(nn.Module):
    """State at t = MLP(mean of the real item vectors at positions <= t, or with --context window of the
    window's other real items); MLP = identity without --dssm-mlp,
    else Linear+tanh per hidden size (the reference's MLP activation) and a last Linear back to --dim."""

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        layers: list[nn.Module] = []
        width = cfg.dim
        for size in parse_sizes(cfg.dssm_mlp):
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        if layers:
            layers.append(nn.Linear(width, cfg.dim))
        self.mlp = nn.Sequential(*layers)  # empty: identity
        self.objective = context_objective(cfg)  # Recommender.draw_hidden reads it

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """targets [B, L]: --context window's trained slots, each the mean of the window's other items."""
        total, count = history_sums(self.drop(x), mask, targets)
        return self.mlp(total / count.clamp(min=1))


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position (losses.sequence_macs): the running mean's d, then the
    user MLP's (each hidden size, and back to --dim)."""
    sizes = [cfg.dim, *parse_sizes(cfg.dssm_mlp)]
    if len(sizes) > 1:
        sizes.append(cfg.dim)
    return cfg.dim + sum(a * b for a, b in zip(sizes, sizes[1:]))
