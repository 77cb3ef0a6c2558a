"""Training losses over user states and item vectors. Pure functions, no model state.

- ``bpr``: one sampled negative per position, -log sigmoid(s_pos - s_neg) (the PixelRec code's loss).
- ``softmax``: cross-entropy of each position's target among candidate items: the whole catalogue
  (full softmax) or a sampled candidate set (in-batch targets + uniform negatives) whose logits are
  corrected by log of each candidate's expected number of draws (log-q correction), since in-batch
  targets are drawn proportionally to popularity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(states: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """states, pos, neg: [P, d] for P target positions; reduction "mean" or "sum" over them."""
    losses = -F.logsigmoid((states * pos).sum(-1) - (states * neg).sum(-1))
    return losses.mean() if reduction == "mean" else losses.sum()


def softmax_loss(
    states: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, logq: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """states [P, d], candidates [C, d], labels [P] (index into candidates), logq [C] or None;
    reduction "mean" or "sum" over the P positions."""
    logits = states @ candidates.T  # [P, C]
    if logq is not None:
        logits = logits - logq
    return F.cross_entropy(logits, labels, reduction=reduction)


def expected_draws_log(
    candidate_items: torch.Tensor, popularity: torch.Tensor, num_positives: int, num_uniform: int, num_items: int
) -> torch.Tensor:
    """log E[#times each candidate is drawn] = log(P * p_pop(i) + n_uniform / N)  -> [C]."""
    p = popularity[candidate_items]
    return torch.log(num_positives * p + num_uniform / num_items)
