"""NextItNet (Yuan et al. 2019): a causal dilated residual CNN over the history.

Layout as the PixelRec / RecBole `ResidualBlock_b`: each residual block convolves (kernel 3) at dilation
d, LayerNorm, ReLU, again at dilation 2d, LayerNorm, ReLU, and adds its input. `--dilations 1,4` with
`--layers 3` (the reference's block_num) is 6 blocks, i.e. dilations 1,2,4,8 three times. No final
linear layer (the reference's `final_layer: False`).

Fast: each convolution is one Conv1d over [B, d, L] with (k - 1) * dilation zeros padded on the left,
so a position only sees itself and earlier positions (causal) and the whole window runs in one call.
Padding: left-padded slots are set to zero before every convolution, exactly what the convolution's
own left zero-padding holds, so a history's states do not depend on how much padding precedes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SequenceConfig, parse_dilations

KERNEL = 3
LN_EPS = 1e-8  # RecBole / PixelRec ResidualBlock_b


class CausalConv(nn.Module):
    """Conv1d over [B, d, L] that pads (k - 1) * dilation zeros on the left: output t sees inputs <= t."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.pad = (KERNEL - 1) * dilation
        self.conv = nn.Conv1d(dim, dim, KERNEL, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv(dim, dilation)
        self.ln1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.conv2 = CausalConv(dim, 2 * dilation)
        self.ln2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [B, d, L] with padded slots zero; keep [B, 1, L] float (1 = real item)."""
        y = F.relu(self.ln1(self.conv1(x).transpose(1, 2))).transpose(1, 2) * keep
        y = F.relu(self.ln2(self.conv2(y).transpose(1, 2))).transpose(1, 2)
        return (x + y) * keep


class NextItNet(nn.Module):
    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        dilations = parse_dilations(cfg.dilations)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.dim, d) for _ in range(cfg.layers) for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[:, None, :].to(x.dtype)  # [B, 1, L]
        h = self.drop(x).transpose(1, 2) * keep  # [B, d, L]
        for block in self.blocks:
            h = block(h, keep)
        return h.transpose(1, 2)


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position (losses.sequence_macs): two kernel-3 d x d convolutions
    per residual block, one block per dilation and repetition."""
    return cfg.layers * len(parse_dilations(cfg.dilations)) * 2 * KERNEL * cfg.dim * cfg.dim
