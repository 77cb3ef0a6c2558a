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

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .models.registry import model_spec

if TYPE_CHECKING:
    from .config import SequenceConfig


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
MIN_SAVING = 3.0  # sample only where the modelled step is at least this many times cheaper than the full one
MAX_NEGATIVE_SHARE = 0.25  # never more uniform negatives than this share of the catalogue
# the fewest uniform negatives the rule samples with (so it never samples under 4 x this many items):
# in short training 1,792 negatives lost 8% / 45% of the full softmax's test NDCG@10 on 20K / 39K
# items (4,096: 30% at 39K, within seed noise at 78K), and 3,840 were within seed noise of it at 10K
# items trained to the best epoch (docs/performance.md)
RULE_MIN_NEGATIVES = 4096
# Cost of a softmax logit (and of the item tower's per-item work) relative to one multiply-add of the
# sequence encoder, per device. CPU: 1.0, calibrated (above). CUDA: NOT calibrated (no GPU was at hand);
# a conservative guess: the logits are one large matrix product that runs near a GPU's peak while the
# encoder's many small kernels (d 64, 20 positions) do not, so they are counted at a tenth. The full
# softmax then stays up to catalogues about 10x larger than on CPU, and where it samples the same
# budget buys 10x the negatives.
LOGIT_WEIGHT = {"cpu": 1.0, "cuda": 0.1}


def device_kind(device: object) -> str:
    """"cuda" for a CUDA device (torch.device or "cuda[:N]"), else "cpu" (the calibrated default)."""
    return "cuda" if str(getattr(device, "type", device)).startswith("cuda") else "cpu"


def logit_macs(dim: int) -> float:
    """Modelled cost of one softmax logit, forward and backward, in multiply-adds."""
    return 3.0 * dim


def sequence_macs(cfg: "SequenceConfig", tokens: int) -> float:
    """Modelled multiply-adds of the sequence encoder `cfg.model` over `tokens` window positions (padding
    included), forward and backward (3x the forward). Each model states its forward cost per position
    in its own module, `token_macs(cfg)` beside the class its ModelSpec's factory names."""
    spec = model_spec(cfg.model)
    if cfg.layers is None and "layers" in spec.reads:
        cfg = replace(cfg, layers=spec.defaults["model.layers"])
    module = importlib.import_module(f"{__package__}.models.{spec.factory.partition(':')[0]}")
    return 3.0 * tokens * module.token_macs(cfg)


@dataclass(frozen=True)
class SoftmaxPlan:
    """The cost rule's choice and the modelled costs behind it (multiply-adds per step, device-weighted).

    `negatives` is the sampled softmax's count the rule weighed (also when it keeps the full softmax:
    0 only where sampling was not weighed at all); `full` says which one it picked, `reason` why."""

    full: bool
    negatives: int
    full_macs: float  # the full softmax: every known item's logit at every trained position (+ their vectors)
    other_macs: float  # the rest of the step: sequence encoder (+ the tower on the batch's items)
    sampled_macs: float = 0.0  # the sampled softmax with `negatives` (+ the step's distinct targets)
    device: str = "cpu"
    reason: str = ""

    @property
    def full_share(self) -> float:
        """Modelled share of a full-softmax step spent in the full softmax."""
        return self.full_macs / max(self.full_macs + self.other_macs, 1.0)

    @property
    def saving(self) -> float:
        """Modelled cost of a full-softmax step over that of a sampled-softmax step."""
        return (self.other_macs + self.full_macs) / max(self.other_macs + self.sampled_macs, 1.0)

    def record(self) -> dict:
        """The plan as config.json records it (the run's "softmax" object, with the resolved choice)."""
        return {"device": self.device, "logit_weight": LOGIT_WEIGHT[self.device],
                "full_step_macs": round(self.other_macs + self.full_macs),
                "sampled_step_macs": round(self.other_macs + self.sampled_macs),
                "rest_of_step_macs": round(self.other_macs), "saving": round(self.saving, 3),
                "weighed_negatives": self.negatives, "min_saving": MIN_SAVING,
                "max_negative_share": MAX_NEGATIVE_SHARE, "rule": "full" if self.full else "sampled",
                "reason": self.reason}


def plan_softmax(num_items: int, positions: float, dim: int, other_macs: float, item_macs: float = 0.0,
                 max_share: float = 0.5, min_negatives: int = RULE_MIN_NEGATIVES,
                 batch_items: float | None = None, device: str = "cpu") -> SoftmaxPlan:
    """Sampled softmax only where it makes the whole step at least `MIN_SAVING` times cheaper with at
    least `min_negatives` (4,096) and at most `MAX_NEGATIVE_SHARE` of the catalogue as negatives; else full.

    The negatives weighed: as many as a budget of other_macs * max_share / (1 - max_share) buys (=
    other_macs at 0.5: the sampled softmax may cost what the rest of the step costs), in multiples of
    256, at least `min_negatives`, at most a quarter of the catalogue. The step costs compared: rest +
    full softmax against rest + sampled softmax (the step's distinct targets plus the negatives).

    num_items: candidate items of the full softmax; positions: trained positions per step;
    batch_items: distinct targets among them (the sampled softmax's in-batch candidates; default:
    `positions`, all distinct); item_macs: the item tower's cost per item, forward and backward (0 for
    an embedding lookup), paid for every item by the full softmax and for every candidate by the
    sampled one; device: "cpu" or "cuda" (`LOGIT_WEIGHT`).
    """
    per_candidate = LOGIT_WEIGHT[device] * (positions * logit_macs(dim) + item_macs)
    full_macs = num_items * per_candidate

    def plan(full: bool, negatives: int = 0, sampled: float = 0.0, reason: str = "") -> SoftmaxPlan:
        return SoftmaxPlan(full, negatives, full_macs, other_macs, sampled, device, reason)

    if num_items <= 0:
        return plan(True, reason="no items to sample from")
    budget = other_macs * max_share / (1.0 - max_share)
    in_batch = min(positions if batch_items is None else batch_items, num_items)
    fresh = max(1.0 - in_batch / num_items, 1e-9)  # share of uniform negatives that are not in-batch targets
    affordable = (budget / max(per_candidate, 1e-9) - in_batch) / fresh
    cap = num_items * MAX_NEGATIVE_SHARE
    negatives = int(max(min(affordable, cap), 0) // NEGATIVES_ROUNDING) * NEGATIVES_ROUNDING
    negatives = max(negatives, min_negatives)
    sampled = min(in_batch + negatives * fresh, num_items) * per_candidate
    weighed = plan(True, negatives, sampled)
    if negatives > cap:
        return plan(True, negatives, sampled, f"{negatives:,} negatives would be more than a quarter of the "
                                              f"{num_items:,} items")
    if weighed.saving < MIN_SAVING:
        return plan(True, negatives, sampled, f"sampling {negatives:,} negatives would make the step only "
                                              f"{weighed.saving:.1f}x cheaper (< {MIN_SAVING:g}x)")
    return plan(False, negatives, sampled, f"sampling {negatives:,} negatives makes the step "
                                           f"{weighed.saving:.1f}x cheaper (>= {MIN_SAVING:g}x)")
