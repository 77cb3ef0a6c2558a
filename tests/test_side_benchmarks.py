"""The side-tower rows of benchmarks/fit_cost.py and benchmarks/coldstart.py: every row is a fit
configuration pixelrec accepts and builds the tower it names, and the issue's two bars are computed
as stated (epoch time <= 2x frozen's; at least half the NDCG@10 gap from frozen to partial)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fixtures_runs import hidden_settings_cache, synth_dataset
from pixelrec.data.sequences import load_sequences
from pixelrec.encode.cache import open_cache
from pixelrec.recommend.config import FitConfig
from pixelrec.recommend.side_tower import SideTower, build_side_tower

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import coldstart  # noqa: E402
import fit_cost  # noqa: E402

SIDE_ROWS = [("fit_cost", n, o) for n, o in fit_cost.TOWERS.items() if n.startswith("side")] + [
    ("coldstart", n, o) for n, o in coldstart.SIDE.items()]


@pytest.mark.parametrize("where, name, overrides", SIDE_ROWS, ids=[f"{w}:{n}" for w, n, _ in SIDE_ROWS])
def test_every_side_row_is_an_accepted_config_reading_the_taps_it_names(where, name, overrides):
    cache = hidden_settings_cache()  # taps 0, 2, 4 of the tiny ViT
    cfg = FitConfig(interactions=str(synth_dataset().interactions), out="unused")
    for key, value in overrides.items():
        if key not in ("cache", fit_cost.CACHE):
            cfg.set(key, value)
    cfg.items.cache = str(cache)
    cfg.validate()
    assert cfg.items.kind == "side" or (cfg.items.kind == "hybrid" and cfg.items.image_branch == "side")
    data = load_sequences(cfg.interactions)
    torch.manual_seed(0)
    tower = build_side_tower(open_cache(cache), data, 8, cfg.items, "mlp")
    assert isinstance(tower, SideTower)
    assert tower.taps == [0, 2, 4]  # all of them, and for `even` the even ones and the last
    assert tower.encode(torch.arange(1, 6)).shape == (5, 8)


def test_the_mean_recipes_read_a_cls_mean_cache_and_the_others_a_cls_one():
    assert coldstart.HIDDEN_CACHES == {"hidden": "cls", "hidden-mean": "cls+mean"}
    assert {n: o["cache"] for n, o in coldstart.SIDE.items()} == {
        "side": "hidden", "side-even": "hidden", "side-mean": "hidden-mean", "side-hybrid": "hidden"}
    assert [n for n, o in fit_cost.TOWERS.items() if o.get(fit_cost.CACHE) == "mean"] == ["side-mean", "side-even-mean"]
    assert fit_cost.tower_reads("side-hybrid") == ("hidden",) and fit_cost.tower_reads("frozen") == ("embeddings",)


def _summary(**ndcg_and_time) -> dict:
    return {name: {"s_per_epoch": (t, 0.0), "ndcg@10": (q, 0.0), "seeds": 1} for name, (q, t) in ndcg_and_time.items()}


def test_the_bars_are_the_time_ratio_and_the_share_of_the_gap_recovered():
    lines = fit_cost.target_lines(_summary(frozen=(0.20, 1.0), partial=(0.22, 4.0), side=(0.215, 1.9),
                                           **{"side-even": (0.205, 1.5), "side-mean": (0.219, 2.1)}))
    assert "(2.00)" in lines[0] and "(0.2100)" in lines[0]
    side, even, mean = lines[1:]
    assert "side " in side and "frozen 1.90" in side and "recovered 0.75" in side and side.endswith("meets both")
    assert "recovered 0.25" in even and even.endswith("misses")  # too little of the gap
    assert "frozen 2.10" in mean and mean.endswith("misses")  # too slow
    assert fit_cost.target_lines(_summary(frozen=(0.2, 1.0), side=(0.3, 1.0))) == []  # no partial: no bar
