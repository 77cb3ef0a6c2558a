"""`pixelrec demo` on a tiny catalogue: every tower's row, the hybrid's warm/cold ratios and its
frontier across ID-dropout rates, the plot, and a retrieval from an image run."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from pixelrec.demo import DemoConfig, FitClock, run_demo, tradeoff_lines
from pixelrec.runtime import is_quiet, set_quiet


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(workdir=str(work), users=120, items=60, cold_items=6, epochs=2, patience=1, dim=8,
                     max_len=6, device="cpu", towers=("id", "frozen", "hybrid"), hybrid_sweep=(0.0, 0.5))
    quiet = is_quiet()
    set_quiet(False)  # the stage lines are part of what is tested
    try:
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            result = run_demo(cfg)
    finally:
        set_quiet(quiet)
    result.log = stderr.getvalue()
    return cfg, result


def test_demo_table_has_every_tower_and_the_hybrids_frontier(demo):
    cfg, result = demo
    assert [r["tower"] for r in result.rows] == ["id", "frozen", "hybrid"]
    lines = result.table.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["id", "frozen", "hybrid"]
    # the default hybrid plus each swept rate, in order of the rate
    assert [r["id_dropout"] for r in result.sweep] == [0.0, 0.3, 0.5]
    assert result.sweep[1]["run_dir"] == result.rows[2]["run_dir"]
    assert any(line.startswith("hybrid: warm NDCG@10") for line in lines)
    at = lines.index(next(line for line in lines if line.startswith("hybrid by --id-dropout p (warm = ")))
    assert lines[at + 1].split() == ["p", "warm", "cold", "best", "ep"]
    assert [line.split()[0] for line in lines[at + 2:at + 5]] == ["0", "0.3", "0.5"]
    assert "no ID dropout" in lines[at + 2] and "not a cold-start recipe" in lines[at + 2]
    assert "the default" in lines[at + 3]
    assert Path(result.plot).stat().st_size > 10_000
    assert result.retrieval["run_dir"].endswith("run_frozen") and len(result.retrieval["items"]) == 5


@pytest.mark.smoke
def test_tradeoff_ratios_are_the_hybrid_against_id_and_the_best_image_tower():
    rows = [{"tower": "id", "warm_ndcg@10": 0.20, "cold_recall@10": 0.0},
            {"tower": "frozen", "warm_ndcg@10": 0.15, "cold_recall@10": 0.10},
            {"tower": "partial", "warm_ndcg@10": 0.16, "cold_recall@10": 0.20},
            {"tower": "hybrid", "warm_ndcg@10": 0.19, "cold_recall@10": 0.15}]
    sweep = [{"id_dropout": 0.0, "warm_ndcg@10": 0.20, "cold_recall@10": 0.05}, {**rows[3], "id_dropout": 0.3}]
    lines = tradeoff_lines(rows, sweep)
    assert lines[0] == ("hybrid: warm NDCG@10 0.950 x id's, cold Recall@10 0.750 x the best image-only "
                        "tower's (bars: 0.98, 0.9)")
    assert lines[1].startswith("hybrid by --id-dropout p (warm = warm NDCG@10 / id's, cold = cold Recall@10")
    assert lines[2].split() == ["p", "warm", "cold", "best", "ep"]
    assert lines[3].split()[:4] == ["0", "1.000", "0.250", "-"] and "no ID dropout" in lines[3]
    assert lines[4].split()[:3] == ["0.3", "0.950", "0.750"] and "the default" in lines[4]
    # with the cold users known, the noise of a cold ratio: 2 sqrt(r (1 - r) / n) / r for r = 0.2, n = 100
    noisy = tradeoff_lines([{**r, "cold_users": 100} for r in rows], sweep)
    assert noisy[-1] == "  cold ratios within about +-0.40 of each other are sampling noise (100 cold test users)"
    assert tradeoff_lines(rows[:3]) == []  # no hybrid row: nothing to compare
    # the demo's own sweep leaves out p=0, whose early-stopped fit reads like a cold recipe (see DemoConfig)
    assert 0.0 not in DemoConfig().hybrid_sweep and DemoConfig().hybrid_sweep == (0.25, 0.5)


def test_the_demo_counts_its_fits_and_estimates_the_time_left(demo):
    _, result = demo
    fits = re.findall(r"\[3/4\] fit (\d) of (\d): SASRec with the (\w+) .*; (.*)", result.log)
    assert [(k, n, tower) for k, n, tower, _ in fits] == [("1", "5", "id"), ("2", "5", "frozen"), ("3", "5", "hybrid"),
                                                          ("4", "5", "hybrid"), ("5", "5", "hybrid")]
    assert fits[0][3] == "time left estimated after the first fit"
    assert all(re.fullmatch(r"about \d+ (s|min) left \(estimate\)", left) for *_, left in fits[1:])
    assert "at --id-dropout 0 (warm/cold frontier)" in result.log

    clock = FitClock([("id",), ("e2e",), ("hybrid",)])
    assert clock.remaining(0) == "time left estimated after the first fit"
    clock.done(0, 10.0, epochs=5)  # 2 s per epoch of weight 1; e2e (8) and hybrid (2.4) at 5 epochs: 104 s
    assert clock.remaining(1) == "about 2 min left (estimate)"
    clock.done(1, 80.0, epochs=10)  # 90 s for 5 + 80 weighted epochs; the hybrid at 7.5 epochs: 19 s
    assert clock.remaining(2) == "about 19 s left (estimate)"
