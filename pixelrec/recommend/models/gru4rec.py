"""GRU4Rec: a GRU over the history."""

from __future__ import annotations

import torch
from torch import nn

from ..config import SequenceConfig
from .layers import init_weights


class GRU4Rec(nn.Module):
    """GRU over the session (Hidasi et al. 2016), projected back to the item space."""

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        hidden = cfg.gru_hidden or 2 * cfg.dim
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.dim, hidden, num_layers=cfg.layers, batch_first=True)
        self.out = nn.Linear(hidden, cfg.dim)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        # Left padding -> right padding, so the GRU starts at the first real item; outputs at real
        # positions are then exact (padding only comes after them) and we shift them back.
        pad = (~mask).sum(1, keepdim=True)  # [B, 1]
        t = torch.arange(L, device=x.device)[None]  # [1, L]
        to_right = ((t + pad) % L)[..., None].expand(-1, -1, x.shape[-1])  # [B, L, d]
        h, _ = self.gru(self.drop(torch.gather(x, 1, to_right)))  # [B, L, hidden]
        to_left = ((t - pad) % L)[..., None].expand(-1, -1, h.shape[-1])
        return self.out(self.drop(torch.gather(h, 1, to_left)))


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position (losses.sequence_macs): 3 gates x (input x h + h x h)
    per layer, then the h x d output projection."""
    h = cfg.gru_hidden or 2 * cfg.dim
    return sum(3 * ((cfg.dim if i == 0 else h) * h + h * h) for i in range(cfg.layers)) + h * cfg.dim
