"""The softmax choice by modelled cost (`losses.plan_softmax`, `build.resolve_softmax`): the cost
model's arithmetic against hand-computed cases (the issue's 24K-item setting, a million items, CPU
against CUDA, the quarter cap), the positions and distinct targets it counts against
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
from pixelrec.recommend.config import MODEL_SPECS, FitConfig, SequenceConfig
from pixelrec.recommend.losses import device_kind, logit_macs, plan_softmax, sequence_macs
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
def seq(model: str, **kw) -> SequenceConfig:
    return SequenceConfig(model=model, **{"dim": 2, "max_len": 3, "layers": 1, "inner_mult": 4, **kw})


def test_sequence_macs_hand_cases():
    # SASRec, d 2, L 3, inner 4, 1 layer: 4*4 + 2*4*4 + 2*3*2 = 60 per position; x3 (fwd + bwd) x 2 positions
    assert sequence_macs(seq("sasrec"), tokens=2) == 360
    assert sequence_macs(seq("sasrec", layers=2), tokens=2) == 720
    # GRU4Rec, d 2, hidden 4: 3 (2*4 + 4*4) + 4*2 = 80 per position; a second layer adds 3 (4*4 + 4*4) = 96
    assert sequence_macs(seq("gru4rec"), tokens=5) == 3 * 5 * 80
    assert sequence_macs(seq("gru4rec", layers=2), tokens=5) == 3 * 5 * (80 + 96)
    # NextItNet, dilations 1,4 (2 blocks), 2 kernel-3 convolutions of 2x2 each: 2 * 2 * 3 * 4 = 48
    assert sequence_macs(seq("nextitnet", dilations="1,4"), tokens=1) == 3 * 48
    # layers left unset: the model's default (SASRec's 2)
    assert sequence_macs(seq("sasrec", layers=None), tokens=2) == 720
    assert logit_macs(64) == 192


@pytest.mark.parametrize("model", [name for name, spec in MODEL_SPECS.items() if spec.trains])
def test_every_models_modelled_cost_is_what_its_forward_pass_multiplies(model):
    """The cost rule's per-position cost of each registry model against torch's count of the matrix
    products of one forward pass (8 windows of 12, d 32, 2 layers): within 5% (+ d for running sums)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixelrec.recommend.sequence import build_sequence_encoder

    B, L, d = 8, 12, 32
    extra = {"dssm_mlp": "48"} if "dssm_mlp" in MODEL_SPECS[model].reads else {}
    cfg = SequenceConfig(model=model, dim=d, max_len=L, layers=2, heads=2, inner_mult=2, **extra)
    enc = build_sequence_encoder(cfg, num_users=5)
    x, mask = torch.randn(B, L, d), torch.ones(B, L, dtype=torch.bool)
    args = (x, mask)
    if getattr(enc, "reads_items", False):
        args = (x, mask, torch.randint(1, 20, (B, L)))
    if getattr(enc, "reads_users", False):
        args = (x, mask, torch.zeros(B, dtype=torch.long), *args[2:])
    if model == "acf":  # attends over each item's cached tokens: the shape its cost assumes
        from pixelrec.recommend.models.acf import COST_TOKENS, COST_WIDTH

        enc.attach_tokens(torch.randn(20, COST_TOKENS, COST_WIDTH))
    with FlopCounterMode(display=False) as counter:
        enc(*args)
    counted = counter.get_total_flops() / 2 / (B * L)  # multiply-adds per window position
    modelled = sequence_macs(cfg, tokens=1) / 3  # forward only
    assert abs(counted - modelled) <= 0.05 * modelled + d, (counted, modelled)


SASREC_REST = 3 * 2_560 * 2 * (4 * 64**2 + 8 * 64**2 + 40 * 64)  # SASRec defaults, batch 128: 794,296,320


@pytest.mark.smoke
def test_full_softmax_where_sampling_saves_little():
    # 100 items: 4,096 negatives (the rule's fewest) would be more than a quarter of the catalogue
    plan = plan_softmax(100, positions=10, dim=4, other_macs=12_000)
    assert plan.full and plan.full_macs == 12_000 and plan.full_share == 0.5 and plan.negatives == 4_096
    assert plan.reason == "4,096 negatives would be more than a quarter of the 100 items"
    assert plan_softmax(16_383, positions=10, dim=64, other_macs=1.0).full  # never under 4 x 4,096 items
    assert not plan_softmax(16_384, positions=10, dim=64, other_macs=1.0).full  # 16,384 / 4,106 = 4x cheaper
    # 10,000 items, 100 positions, d 10: full 3e7; the budget 2e7 buys (6,666.7 - 100) / 0.99 = 6,633
    # negatives, capped at 2,500 -> 2,304 (with a floor of 1,024); sampled (100 + 2,304 x 0.99) x 3,000 =
    # 7.14e6: the step is (2e7 + 3e7) / (2e7 + 7.14e6) = 1.84x cheaper, short of 3x
    plan = plan_softmax(10_000, positions=100, dim=10, other_macs=2e7, min_negatives=1024)
    assert plan.full and plan.negatives == 2_304
    assert plan.sampled_macs == pytest.approx((100 + 2_304 * 0.99) * 3_000)
    assert plan.saving == pytest.approx(5e7 / (2e7 + (100 + 2_304 * 0.99) * 3_000))
    assert plan.reason == "sampling 2,304 negatives would make the step only 1.8x cheaper (< 3x)"


def test_sampled_negatives_are_what_the_budget_buys():
    # 100,000 items, 100 positions, d 10: a candidate costs 3,000; budget 3e7 buys 10,000 candidates;
    # 100 are in-batch targets, and a uniform negative is new with probability 1 - 100/1e5:
    # (10,000 - 100) / 0.999 = 9,909.9 -> 9,728 (multiples of 256); the step: 3.3e8 against
    # 3e7 + (100 + 9,728 x 0.999) x 3,000 = 5.945e7, 5.55x cheaper
    plan = plan_softmax(100_000, positions=100, dim=10, other_macs=3e7)
    assert not plan.full and plan.negatives == 9_728
    assert plan.full_macs == 3e8 and plan.full_share == pytest.approx(3e8 / 3.3e8)
    assert plan.saving == pytest.approx(3.3e8 / (3e7 + (100 + 9_728 * 0.999) * 3_000))
    # a small budget still gets min_negatives: the rule's 4,096 by default
    assert plan_softmax(100_000, positions=100, dim=10, other_macs=3e5).negatives == 4_096
    assert plan_softmax(100_000, positions=100, dim=10, other_macs=3e5, min_negatives=1024).negatives == 1024
    # the tower's per-item cost is paid per candidate: 3,000 + 7,000 per candidate -> 3,000 candidates
    # (3,000 - 100) / 0.999 = 2,902.9 -> 2,816
    assert plan_softmax(100_000, positions=100, dim=10, other_macs=3e7, item_macs=7_000,
                        min_negatives=1024).negatives == 2_816


def test_the_issues_24k_catalogue_keeps_the_full_softmax():
    # SASRec defaults on 24,000 items with 372 trained positions and 340 distinct targets a step: the
    # former rule (negatives up to the budget, up to half the catalogue) took (794,296,320 / 71,424 -
    # 340) / (1 - 340 / 24,000) = 10,935 -> 10,752 negatives, 45% of the catalogue. Now: at most a
    # quarter (5,888), and the step would be only (7.94e8 + 1.714e9) / (7.94e8 + 6,144.6 x 71,424) =
    # 2.0x cheaper: full.
    per_candidate = 372 * 192
    assert (SASREC_REST / per_candidate - 340) / (1 - 340 / 24_000) // 256 * 256 == 10_752
    plan = plan_softmax(24_000, positions=372, dim=64, other_macs=SASREC_REST, batch_items=340)
    assert plan.full and plan.negatives == 5_888
    assert plan.saving == pytest.approx((SASREC_REST + 24_000 * per_candidate)
                                        / (SASREC_REST + (340 + 5_888 * (1 - 340 / 24_000)) * per_candidate))
    assert 2.0 < plan.saving < 2.1


def test_a_million_items_sample_on_cpu_and_cuda():
    # 1,000 positions, 900 distinct targets: a candidate costs 192,000 on CPU; the budget buys (4,137 - 900)
    # / 0.9991 = 3,240 -> 3,072 negatives, raised to the rule's 4,096; the step is
    # 1.928e11 / (7.94e8 + (900 + 4,096 x 0.9991) x 192,000) = 110x cheaper
    cpu = plan_softmax(1_000_000, positions=1_000, dim=64, other_macs=SASREC_REST, batch_items=900)
    assert not cpu.full and cpu.negatives == 4_096 and 109.5 < cpu.saving < 110.5
    # CUDA counts a logit at a tenth: the same budget buys 10x the candidates: (41,370 - 900) / 0.9991 =
    # 40,506 -> 40,448 negatives, still 4% of the catalogue and a 12.6x cheaper step
    cuda = plan_softmax(1_000_000, positions=1_000, dim=64, other_macs=SASREC_REST, batch_items=900, device="cuda")
    assert not cuda.full and cuda.negatives == 40_448 and 12 < cuda.saving < 13
    assert cuda.full_macs == pytest.approx(cpu.full_macs / 10)


def test_cpu_and_cuda_differ_at_50k_items():
    # 50,000 items, 1,000 positions: sampling makes a CPU step 6.0x cheaper, a CUDA step 1.7x: CUDA keeps full
    cpu = plan_softmax(50_000, positions=1_000, dim=64, other_macs=SASREC_REST, batch_items=900)
    cuda = plan_softmax(50_000, positions=1_000, dim=64, other_macs=SASREC_REST, batch_items=900, device="cuda")
    assert not cpu.full and cpu.negatives == 4_096 and 5.9 < cpu.saving < 6.1
    assert cuda.full and 1.6 < cuda.saving < 1.8 and cuda.reason.endswith("(< 3x)")
    assert device_kind(torch.device("cuda", 1)) == device_kind("cuda:0") == "cuda"
    assert device_kind(torch.device("cpu")) == device_kind("mps") == "cpu"  # uncalibrated devices: CPU's constants


def test_never_more_negatives_than_a_quarter_of_the_catalogue():
    # a generous budget (share 0.9: 9x the rest of the step) would buy (90,000 - 100) / 0.999 = 89,990
    # negatives; the cap is 25,000 -> 24,832, and the step is still 3.3e8 / (3e7 + 7.45e7) = 3.15x cheaper
    plan = plan_softmax(100_000, positions=100, dim=10, other_macs=3e7, max_share=0.9)
    assert not plan.full and plan.negatives == 24_832
    for items, positions, rest, share in itertools.product((3_000, 4_096, 20_000, 250_000), (50, 1_000),
                                                          (1e6, 1e8, 1e10), (0.5, 0.9)):
        plan = plan_softmax(items, positions=positions, dim=64, other_macs=rest, max_share=share)
        assert plan.full or (plan.negatives <= items / 4 and plan.saving >= 3), (items, positions, rest, share)
        assert plan.full or plan.negatives >= 4_096


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
    data = random_data(40_000, users=4_000)
    cfg = config()
    tower = build_tower(cfg, data)
    plan = softmax_plan(cfg, data, tower)
    # by hand: SASRec d 64, L 20, 2 layers: 103,424 multiply-adds per position per pass, 3 passes, 2,560
    # positions; the full softmax: every item with training interactions x positions x 192
    positions = 128 * mean_trained_per_window(cfg, data)
    known = int((data.train_counts[1:] > 0).sum())
    assert 36_000 < known < 40_000  # some items occur only as a validation or test target
    assert plan.other_macs == 3 * 2_560 * 2 * (4 * 64**2 + 8 * 64**2 + 40 * 64)
    assert plan.full_macs == pytest.approx(known * positions * 192, rel=1e-12)
    assert not plan.full and plan.negatives >= 4_096 and plan.negatives % 256 == 0
    resolve_softmax(cfg, data, tower)
    assert cfg.loss.softmax == "sampled" and cfg.loss.negatives == plan.negatives
    model = build_recommender(config(), data)  # build_recommender resolves the same way
    assert not model.loss_cfg.use_full_softmax(model.tower) and model.loss_cfg.uniform_negatives() == plan.negatives
    assert model.softmax_choice["decided_by"] == "auto" and model.softmax_choice["negatives"] == plan.negatives
    # on CUDA the same 40K items keep the full softmax (a logit counts a tenth: sampling saves < 3x)
    cuda = build_recommender(config(), data, torch.device("cuda", 0))
    assert cuda.loss_cfg.use_full_softmax(cuda.tower) and cuda.softmax_choice["device"] == "cuda"
    assert cuda.softmax_choice["rule"] == "full" and cuda.softmax_choice["saving"] < 3


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
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    loss, choice = meta["config"]["loss"], meta["softmax"]
    assert loss["softmax"] == "full" and loss["negatives"] == 0  # 80 items: the full softmax is cheap
    # the modelled costs behind it: 4,096 negatives are more than a quarter of the catalogue
    assert choice["softmax"] == "full" and choice["rule"] == "full" and choice["decided_by"] == "auto"
    assert choice["device"] == "cpu" and choice["logit_weight"] == 1.0 and choice["weighed_negatives"] == 4_096
    assert choice["reason"].startswith("4,096 negatives would be more than a quarter of the ")
    rest = choice["rest_of_step_macs"]
    assert rest > 0 and choice["full_step_macs"] > rest and choice["sampled_step_macs"] > rest
    assert choice["saving"] == pytest.approx(choice["full_step_macs"] / choice["sampled_step_macs"], abs=1e-3)
    again = tiny_config(ds.interactions, tmp_path / "run", epochs=2)
    fit(again, resume=True)  # the same settings resolve the same way: the resume is accepted
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["loss"]["softmax"] == "full"
    sampled = tiny_config(ds.interactions, tmp_path / "sampled", epochs=1, negatives=16)
    fit(sampled)
    meta = json.loads((tmp_path / "sampled" / "config.json").read_text())
    assert (meta["config"]["loss"]["softmax"], meta["config"]["loss"]["negatives"]) == ("sampled", 16)
    assert (meta["softmax"]["decided_by"], meta["softmax"]["rule"]) == ("--negatives 16", "full")


def test_resume_keeps_the_rules_choice_of_the_run(tmp_path):
    """The rule's choice depends on the device: a run it sampled (say on CPU) resumes sampled where the
    rule now picks full (say on CUDA), instead of being refused for different settings."""
    ds = synth_dataset()
    fit(tiny_config(ds.interactions, tmp_path / "run", epochs=1))
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["loss"].update(softmax="sampled", negatives=16)  # as if the rule had sampled 16
    meta["softmax"].update(softmax="sampled", negatives=16, rule="sampled")
    path.write_text(json.dumps(meta))
    fit(tiny_config(ds.interactions, tmp_path / "run", epochs=2), resume=True)
    after = json.loads(path.read_text())
    assert (after["config"]["loss"]["softmax"], after["config"]["loss"]["negatives"]) == ("sampled", 16)
    assert after["softmax"]["rule"] == "sampled"  # the run's own record is kept
    # an explicit --softmax full is not the rule's choice: it is refused as a different setting
    full = tiny_config(ds.interactions, tmp_path / "run", epochs=3)
    full.loss.softmax = "full"
    with pytest.raises(PixelrecError, match="different settings"):
        fit(full, resume=True)


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
