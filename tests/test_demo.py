"""`pixelrec demo` on a tiny catalogue: every tower's row, the hybrid's warm/cold ratios and its
frontier across ID-dropout rates, the plot, and a retrieval from an image run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelrec.demo import DemoConfig, format_table, run_demo, tradeoff_lines


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(workdir=str(work), users=120, items=60, cold_items=6, epochs=2, patience=1, dim=8,
                     max_len=6, device="cpu", towers=("id", "frozen", "hybrid"), hybrid_sweep=(0.0, 0.5))
    return cfg, run_demo(cfg)


def test_demo_table_has_every_tower_and_the_hybrids_frontier(demo):
    cfg, result = demo
    assert [r["tower"] for r in result.rows] == ["id", "frozen", "hybrid"]
    lines = result.table.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["id", "frozen", "hybrid"]
    # the default hybrid plus each swept rate, in order of the rate
    assert [r["id_dropout"] for r in result.sweep] == [0.0, 0.3, 0.5]
    assert result.sweep[1]["run_dir"] == result.rows[2]["run_dir"]
    assert any(line.startswith("hybrid: warm NDCG@10") for line in lines)
    assert any(line.startswith("hybrid by --id-dropout: p=0:") for line in lines)
    assert Path(result.plot).stat().st_size > 10_000
    assert result.retrieval["run_dir"].endswith("run_frozen") and len(result.retrieval["items"]) == 5


def test_tradeoff_ratios_are_the_hybrid_against_id_and_the_best_image_tower():
    rows = [{"tower": "id", "warm_ndcg@10": 0.20, "cold_recall@10": 0.0},
            {"tower": "frozen", "warm_ndcg@10": 0.15, "cold_recall@10": 0.10},
            {"tower": "partial", "warm_ndcg@10": 0.16, "cold_recall@10": 0.20},
            {"tower": "hybrid", "warm_ndcg@10": 0.19, "cold_recall@10": 0.15}]
    sweep = [{"id_dropout": 0.0, "warm_ndcg@10": 0.20, "cold_recall@10": 0.05}, {**rows[3], "id_dropout": 0.3}]
    lines = tradeoff_lines(rows, sweep)
    assert lines[0] == ("hybrid: warm NDCG@10 0.950 x id's, cold Recall@10 0.750 x the best image-only "
                        "tower's (bars: 0.98, 0.9)")
    assert lines[1].startswith("hybrid by --id-dropout: p=0: 1.000 / 0.250; p=0.3: 0.950 / 0.750")
    assert tradeoff_lines(rows[:3]) == []  # no hybrid row: nothing to compare
