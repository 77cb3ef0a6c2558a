"""BERT4Rec (Sun et al. 2019): a bidirectional transformer trained by cloze (masked-item prediction).

Training (the ``cloze`` objective, models/registry.py): some items of each training window are
hidden behind a learned mask vector and the states of those slots predict the hidden items
(`batches.cloze_masks` draws which). Inference: a mask slot is appended after the history and its
state is the user vector. `forward` without `hidden` does that, so `Recommender.user_vectors`,
`encode_histories`, evaluation and serving read the last state as they do for every other model.

Choices (docs/models.md):
- The mask vector is a parameter of this module, in the model's d-dimensional item space, so every
  item tower (id, frozen, partial, e2e, hybrid) has a mask slot that no item (no cover) produces.
  The PixelRec code encodes an all-ones image as [MASK] and an all-zeros image as padding instead.
- Padding is no key of the attention, so whatever vector a tower gives the padding index is never
  read, and a history's user vector does not depend on how much left padding it has.
- Positions are learned, counted back from the last slot, max_len + 1 of them: a training window
  holds max_len + 1 items, and at inference max_len history items + the mask slot (the reference's
  10 + 1).
- `bert_head`: Linear + GELU + LayerNorm on the states before scoring (RecBole's head, part of what
  made its BERT4Rec reproducible, #1839); the PixelRec code has none (`--preset pixelrec`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PixelrecError
from ..config import NORMS, SequenceConfig
from .layers import POST_LN_EPS, Block, init_weights


class BERT4Rec(nn.Module):
    objective = "cloze"  # Recommender.draw_hidden reads it with mask_ratio and mask_last

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        if cfg.norm not in NORMS:
            raise PixelrecError(f"unknown --norm {cfg.norm!r}; expected one of {', '.join(NORMS)}")
        self.mask_ratio, self.mask_last = cfg.mask_ratio, cfg.mask_last
        self.item_bias = cfg.item_bias
        self.pos = nn.Embedding(cfg.max_len + 1, cfg.dim)
        post = cfg.norm == "post"
        self.ln_in = nn.LayerNorm(cfg.dim, eps=POST_LN_EPS if post else 1e-5)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_out = nn.Identity() if post else nn.LayerNorm(cfg.dim)
        self.head = (nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.LayerNorm(cfg.dim))
                     if cfg.bert_head else nn.Identity())
        self.apply(init_weights)
        self.mask_vector = nn.Parameter(torch.randn(cfg.dim) * 0.02)  # the [MASK] slot's input vector

    def forward(self, x: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, n, d] item vectors, mask [B, n] (True = real item).

        hidden [B, n] (training): the slots whose item is replaced by the mask vector -> states [B, n, d].
        Without it (inference): a mask slot is appended -> states [B, n + 1, d], the last one the user vector.
        """
        if hidden is None:
            x, mask, hidden = append_mask_slot(x, mask)
        x = torch.where(hidden[..., None], self.mask_vector.to(x.dtype), x)
        L = x.shape[1]
        x = self.drop(self.ln_in(x + self.pos.weight[-L:]))
        keys = mask | hidden
        allowed = keys[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device)  # padded queries see themselves
        for block in self.blocks:
            x = block(x, allowed[:, None])  # [B, 1, L, L]: every query sees every real or hidden slot
        x = self.head(self.ln_out(x))
        if self.item_bias:  # the last coordinate is 1: it multiplies the item vector's bias coordinate
            x = torch.cat([x[..., :-1], x.new_ones(*x.shape[:-1], 1)], -1)
        return x


def append_mask_slot(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, n, d], mask [B, n] -> x and mask with one more (real) slot at the end, and hidden [B, n + 1]
    marking it (its vector is replaced by the mask vector)."""
    B = x.shape[0]
    x = torch.cat([x, x.new_zeros(B, 1, x.shape[2])], 1)
    mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
    hidden = torch.zeros_like(mask)
    hidden[:, -1] = True
    return x, mask, hidden


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position as losses.sequence_macs counts them (max_len per
    window): per slot SASRec's blocks over max_len + 1 keys plus the output head's d^2, and a window
    (or a history with its mask slot) has max_len + 1 slots."""
    d, slots = cfg.dim, cfg.max_len + 1
    per_slot = cfg.layers * (4 * d * d + 2 * cfg.inner_mult * d * d + 2 * slots * d) + (d * d if cfg.bert_head else 0)
    return per_slot * slots / cfg.max_len
