"""Training losses over user states and item vectors. Pure functions, no model state.

- ``bpr``: one sampled negative per position, -log sigmoid(s_pos - s_neg) (the PixelRec code's loss).
- ``softmax``: cross-entropy of each position's target among candidate items: the whole catalogue
  (full softmax) or a sampled candidate set (in-batch targets + uniform negatives) whose logits are
  corrected by log of each candidate's expected number of draws (log-q correction), since in-batch
  targets are drawn proportionally to popularity.

Which softmax a step uses is a cost decision (`plan_softmax`): the full softmax's work grows with
positions x catalogue, the rest of the step does not, so above some catalogue size the full softmax
would dominate every step and an epoch's cost would grow with interactions x catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ------------------------------------------------------------------ the softmax choice (modelled cost)
# A training step's work in multiply-adds (forward + backward = 3x the forward's). One softmax logit
# costs 3 d (its score, and the two gradient products); the softmax's own per-logit work (exp, log,
# normalisation) is left out: on a CPU core the logits' products run at about 2.5x the sequence
# model's multiply-adds per second, which more than pays for it (benchmarks/softmax_choice.py:
# SASRec d 64, batch 128, ~1,000 trained positions a step: the modelled share of the full softmax in
# a step follows the measured one within about 0.1 from 1.7K to 30K items; docs/performance.md).
NEGATIVES_ROUNDING = 256  # the cost rule's negative counts are multiples of this


def logit_macs(dim: int) -> float:
    """Modelled cost of one softmax logit, forward and backward, in multiply-adds."""
    return 3.0 * dim


def sequence_macs(model: str, tokens: int, dim: int, layers: int, max_len: int, inner_mult: int = 4,
                  gru_hidden: int = 0) -> float:
    """Modelled multiply-adds of the sequence encoder over `tokens` window positions (padding included),
    forward and backward: SASRec 4d^2 (attention projections) + 2 inner d^2 (feed-forward) + 2 L d
    (attention) per position and layer; GRU4Rec 3 (in h + h^2) per position and layer + h d output."""
    if model == "gru4rec":
        h = gru_hidden or 2 * dim
        per_token = sum(3 * ((dim if i == 0 else h) * h + h * h) for i in range(layers)) + h * dim
    else:
        per_token = layers * (4 * dim * dim + 2 * inner_mult * dim * dim + 2 * max_len * dim)
    return 3.0 * tokens * per_token


@dataclass(frozen=True)
class SoftmaxPlan:
    """The softmax a training step uses, and the modelled costs behind the choice (multiply-adds per step)."""

    full: bool
    negatives: int  # uniform negatives per step of the sampled softmax (0 with full softmax)
    full_macs: float  # the full softmax: every known item's logit at every trained position (+ their vectors)
    other_macs: float  # the rest of the step: sequence encoder (+ the tower on the batch's items)

    @property
    def full_share(self) -> float:
        """Modelled share of a full-softmax step spent in the full softmax."""
        return self.full_macs / max(self.full_macs + self.other_macs, 1.0)


def plan_softmax(num_items: int, positions: float, dim: int, other_macs: float, item_macs: float = 0.0,
                 max_share: float = 0.5, min_negatives: int = 1024, batch_items: float | None = None) -> SoftmaxPlan:
    """Full softmax while it costs at most `max_share` of the step; else sampled softmax with as many
    uniform negatives as that same budget buys, at least `min_negatives`, and at most as many as bring
    its candidates to half the catalogue (beyond that it would save less than half of the full
    softmax's work). Where even `min_negatives` would pass half the catalogue, the full softmax stays.

    num_items: candidate items of the full softmax; positions: trained positions per step;
    batch_items: distinct targets among them (the sampled softmax's in-batch candidates; default:
    `positions`, all distinct); item_macs: the item tower's cost per item, forward and backward (0 for
    an embedding lookup), paid for every item by the full softmax and for every candidate by the
    sampled one. The softmax's budget is other_macs * max_share / (1 - max_share) (= other_macs at 0.5:
    the softmax may cost what the rest of the step costs).
    """
    per_candidate = positions * logit_macs(dim) + item_macs
    full_macs = num_items * per_candidate
    budget = other_macs * max_share / (1.0 - max_share)
    if full_macs <= budget or num_items <= 0:
        return SoftmaxPlan(True, 0, full_macs, other_macs)
    in_batch = min(positions if batch_items is None else batch_items, num_items)
    fresh = max(1.0 - in_batch / num_items, 1e-9)  # share of uniform negatives that are not in-batch targets
    affordable = (budget / max(per_candidate, 1e-9) - in_batch) / fresh
    half = (num_items / 2 - in_batch) / fresh  # the negatives that bring the candidates to half the catalogue
    negatives = int(max(min(affordable, half), 0) // NEGATIVES_ROUNDING) * NEGATIVES_ROUNDING
    negatives = max(negatives, min_negatives)
    if in_batch + negatives * fresh > num_items / 2:
        return SoftmaxPlan(True, 0, full_macs, other_macs)
    return SoftmaxPlan(False, negatives, full_macs, other_macs)
