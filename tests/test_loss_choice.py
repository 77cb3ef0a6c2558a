"""The softmax choice by modelled cost (`losses.plan_softmax`, `build.resolve_softmax`): the cost
model's arithmetic against hand-computed cases, the positions and distinct targets it counts against
the real windows and brute force, what `fit` records in config.json, and the explicit overrides."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fixtures_runs import synth_dataset, tiny_config
from pixelrec.data.sequences import build_sequences
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import training_windows
from pixelrec.recommend.build import (
    build_recommender,
    build_tower,
    expected_distinct,
    mean_trained_per_window,
    resolve_softmax,
    softmax_plan,
)
from pixelrec.recommend.config import FitConfig
from pixelrec.recommend.losses import logit_macs, plan_softmax, sequence_macs
from pixelrec.recommend.towers import IdTower
from pixelrec.runs.fit import fit


def random_data(n_items: int, users: int, seed: int = 0, low: int = 5, high: int = 30):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high, users)
    items = rng.integers(0, n_items, lengths.sum())
    items[:n_items] = rng.permutation(n_items)  # every item has interactions
    user = np.repeat(np.arange(users), lengths)
    return build_sequences(pd.DataFrame({"item_id": [f"i{i}" for i in items], "user_id": [f"u{u}" for u in user],
                                         "timestamp": np.arange(len(items))}))


def config(**loss) -> FitConfig:
    cfg = FitConfig(interactions="-", out="-")
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg.resolve_defaults()


# ------------------------------------------------------------------------------------ the cost model
def test_sequence_macs_hand_cases():
    # SASRec, d 2, L 3, inner 4, 1 layer: 4*4 + 2*4*4 + 2*3*2 = 60 per position; x3 (fwd + bwd) x 2 positions
    assert sequence_macs("sasrec", tokens=2, dim=2, layers=1, max_len=3, inner_mult=4) == 360
    assert sequence_macs("sasrec", tokens=2, dim=2, layers=2, max_len=3, inner_mult=4) == 720
    # GRU4Rec, d 2, hidden 4: 3 (2*4 + 4*4) + 4*2 = 80 per position; a second layer adds 3 (4*4 + 4*4) = 96
    assert sequence_macs("gru4rec", tokens=5, dim=2, layers=1, max_len=3) == 3 * 5 * 80
    assert sequence_macs("gru4rec", tokens=5, dim=2, layers=2, max_len=3) == 3 * 5 * (80 + 96)
    assert logit_macs(64) == 192


def test_full_softmax_while_it_costs_at_most_the_rest_of_the_step():
    # 100 items, 10 positions, d 4: a candidate costs 10 * 12 = 120, the full softmax 12,000
    plan = plan_softmax(100, positions=10, dim=4, other_macs=12_000)
    assert plan.full and plan.negatives == 0 and plan.full_macs == 12_000 and plan.full_share == 0.5
    # a share of 0.25 allows 4,000 (= 12,000 * 0.25 / 0.75)
    assert plan_softmax(100, positions=10, dim=4, other_macs=36_000, max_share=0.25).full
    assert not plan_softmax(100_000, positions=10, dim=4, other_macs=35_999, max_share=0.25).full


def test_sampled_negatives_are_what_the_budget_buys():
    # 100,000 items, 100 positions, d 10: a candidate costs 3,000; budget 3e7 buys 10,000 candidates;
    # 100 are in-batch targets, and a uniform negative is new with probability 1 - 100/1e5:
    # (10,000 - 100) / 0.999 = 9,909.9 -> 9,728 (multiples of 256)
    plan = plan_softmax(100_000, positions=100, dim=10, other_macs=3e7)
    assert not plan.full and plan.negatives == 9_728
    assert plan.full_macs == 3e8 and plan.full_share == pytest.approx(3e8 / 3.3e8)
    # a small budget still gets min_negatives
    assert plan_softmax(100_000, positions=100, dim=10, other_macs=3e5).negatives == 1024
    # the tower's per-item cost is paid per candidate: 3,000 + 7,000 per candidate -> 3,000 candidates
    # (3,000 - 100) / 0.999 = 2,902.9 -> 2,816
    assert plan_softmax(100_000, positions=100, dim=10, other_macs=3e7, item_macs=7_000).negatives == 2_816


def test_full_softmax_is_kept_when_sampling_would_still_score_half_the_catalogue():
    # 4,000 items, 2,500 distinct in-batch targets: full costs 4,000 x 3,000 = 1.2e7 > budget 1e7; the
    # budget buys (3,333 - 2,500) / 0.375 = 2,222 -> 2,048 negatives, and the sampled softmax would score
    # 2,500 + 2,048 * (1 - 2,500/4,000) = 3,268 > 2,000 items
    plan = plan_softmax(4_000, positions=1_000, dim=1, other_macs=1e7, batch_items=2_500)
    assert plan.full
    # 300 distinct targets, budget 4e6: (1,333 - 300) / 0.925 = 1,117 -> 1,024 negatives;
    # 300 + 1,024 * 0.925 = 1,247 <= 2,000: it samples
    plan = plan_softmax(4_000, positions=1_000, dim=1, other_macs=4e6, batch_items=300)
    assert not plan.full and plan.negatives == 1024


def test_sampled_candidates_stop_at_half_the_catalogue():
    # 10,000 items, 100 positions, d 10: full = 3e7 > budget 2e7; the budget buys (6,666.7 - 100) / 0.99
    # = 6,633 negatives, but half the catalogue is (5,000 - 100) / 0.99 = 4,949.5 -> 4,864
    plan = plan_softmax(10_000, positions=100, dim=10, other_macs=2e7)
    assert not plan.full and plan.negatives == 4_864
    assert plan_softmax(10_000, positions=100, dim=10, other_macs=3e7).full  # 3e7 <= budget 3e7


def test_expected_distinct_targets_brute_force():
    counts = np.array([1, 1, 2, 0])
    p = counts / counts.sum()
    for draws in (1, 2, 3):
        exact = 0.0  # enumerate every sequence of draws
        for seq in itertools.product(range(len(counts)), repeat=draws):
            exact += np.prod(p[list(seq)]) * len(set(seq))
        assert expected_distinct(counts, draws) == pytest.approx(exact, rel=1e-12)
    assert expected_distinct(counts, 2) == pytest.approx(1.625)  # 2 (1 - 0.75^2) + (1 - 0.5^2)


@pytest.mark.parametrize("windows,stride", [("sliding", 3), ("sliding", 1), ("overlapping", 4), ("chunks", 0)])
def test_positions_per_window_match_the_real_windows(windows, stride):
    data = random_data(50, users=60, low=3, high=40)
    cfg = FitConfig(interactions="-", out="-")
    cfg.model.max_len, cfg.train.windows, cfg.train.stride = 10, windows, stride
    real = training_windows(data, 10, windows, stride)
    assert mean_trained_per_window(cfg, data) == pytest.approx(real.trained.mean(), rel=1e-12)


# ------------------------------------------------------------------------------------ the resolution
def test_small_catalogue_keeps_the_full_softmax():
    data = random_data(300, users=400)
    cfg = config()
    plan = resolve_softmax(cfg, data, build_tower(cfg, data))
    assert plan.full and cfg.loss.softmax == "full" and cfg.loss.negatives == 0


def test_large_catalogue_samples_with_the_planned_negatives():
    data = random_data(20_000, users=2_000)
    cfg = config()
    tower = build_tower(cfg, data)
    plan = softmax_plan(cfg, data, tower)
    # by hand: SASRec d 64, L 20, 2 layers: 103,424 multiply-adds per position per pass, 3 passes, 2,560
    # positions; the full softmax: every item with training interactions x positions x 192
    positions = 128 * mean_trained_per_window(cfg, data)
    known = int((data.train_counts[1:] > 0).sum())
    assert 18_000 < known < 20_000  # some items occur only as a validation or test target
    assert plan.other_macs == 3 * 2_560 * 2 * (4 * 64**2 + 8 * 64**2 + 40 * 64)
    assert plan.full_macs == pytest.approx(known * positions * 192, rel=1e-12)
    assert not plan.full and plan.negatives >= 1024 and plan.negatives % 256 == 0
    resolve_softmax(cfg, data, tower)
    assert cfg.loss.softmax == "sampled" and cfg.loss.negatives == plan.negatives
    model = build_recommender(config(), data)  # build_recommender resolves the same way
    assert not model.loss_cfg.use_full_softmax(model.tower) and model.loss_cfg.uniform_negatives() == plan.negatives


def test_explicit_choices_win():
    data = random_data(20_000, users=2_000)
    tower = build_tower(config(), data)
    cfg = config(negatives=64)
    resolve_softmax(cfg, data, tower)
    assert (cfg.loss.softmax, cfg.loss.negatives) == ("sampled", 64)
    cfg = config(softmax="full")
    resolve_softmax(cfg, data, tower)
    assert (cfg.loss.softmax, cfg.loss.negatives) == ("full", 0)
    small = random_data(300, users=400)
    cfg = config(softmax="sampled")  # sampled where full is cheap: the default count, at most the catalogue
    resolve_softmax(cfg, small, build_tower(cfg, small))
    assert (cfg.loss.softmax, cfg.loss.negatives) == ("sampled", 300)
    cfg = config(loss="bpr")
    assert resolve_softmax(cfg, small, tower) is None and cfg.loss.softmax == "auto"


def test_costly_towers_always_sample_and_refuse_full():
    class Costly(IdTower):
        cheap = False

    data = random_data(300, users=400)
    cfg = config()
    resolve_softmax(cfg, data, Costly(data.num_items, 64))
    assert (cfg.loss.softmax, cfg.loss.negatives) == ("sampled", 300)  # 1024, capped at the catalogue
    with pytest.raises(PixelrecError, match="--softmax full needs every item's vector"):
        resolve_softmax(config(softmax="full"), data, Costly(data.num_items, 64))


@pytest.mark.parametrize("loss,message", [
    ({"softmax": "full", "negatives": 8}, "--softmax full scores every item and samples no negatives"),
    ({"softmax": "sampled", "loss": "bpr"}, "--softmax sampled applies to --loss softmax, not --loss bpr"),
])
def test_contradictory_options_are_refused(loss, message):
    with pytest.raises(PixelrecError, match=message):
        config(**loss).check()


def test_the_dense_weights_of_a_tower_count_per_item_cost():
    from pixelrec.recommend.build import _dense_weights

    tower = IdTower(10, 4)
    assert _dense_weights(tower) == 0  # the embedding table is per item
    tower.proj = nn.Linear(4, 3)
    assert _dense_weights(tower) == 12


# ------------------------------------------------------------------------------------ fit records it
def test_fit_records_the_resolved_choice_and_resumes(tmp_path):
    ds = synth_dataset()
    cfg = tiny_config(ds.interactions, tmp_path / "run", epochs=1)
    fit(cfg)
    loss = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["loss"]
    assert loss["softmax"] == "full" and loss["negatives"] == 0  # 80 items: the full softmax is cheap
    again = tiny_config(ds.interactions, tmp_path / "run", epochs=2)
    fit(again, resume=True)  # the same settings resolve the same way: the resume is accepted
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["loss"]["softmax"] == "full"
    sampled = tiny_config(ds.interactions, tmp_path / "sampled", epochs=1, negatives=16)
    fit(sampled)
    loss = json.loads((tmp_path / "sampled" / "config.json").read_text())["config"]["loss"]
    assert (loss["softmax"], loss["negatives"]) == ("sampled", 16)


def test_a_run_from_before_the_rule_resumes(tmp_path):
    ds = synth_dataset()
    fit(tiny_config(ds.interactions, tmp_path / "run", epochs=1))
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["loss"] = {"loss": "softmax", "negatives": 0, "full_softmax_max_items": 100_000}
    path.write_text(json.dumps(meta))
    fit(tiny_config(ds.interactions, tmp_path / "run", epochs=2), resume=True)
    assert json.loads(path.read_text())["config"]["loss"]["softmax"] == "full"


def test_sampled_softmax_with_every_item_as_a_negative_equals_the_full_softmax():
    """log-q correction with uniform negatives covering the catalogue: each candidate's correction is the
    same shift only if no in-batch target is drawn by popularity, so compare against the corrected
    cross-entropy computed by hand over the same candidates."""
    from pixelrec.recommend.losses import expected_draws_log, softmax_loss

    torch.manual_seed(0)
    states, cands = torch.randn(5, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 2, 2, 5, 1])
    pop = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.1])  # item 0 = padding
    items = torch.arange(1, 7)
    logq = expected_draws_log(items, pop, num_positives=5, num_uniform=12, num_items=6)
    assert torch.allclose(logq, torch.log(5 * pop[1:] + 2.0))
    logits = states @ cands.T - logq
    by_hand = -(logits[torch.arange(5), labels] - torch.logsumexp(logits, 1)).mean()
    assert softmax_loss(states, cands, labels, logq).item() == pytest.approx(by_hand.item(), rel=1e-6)
