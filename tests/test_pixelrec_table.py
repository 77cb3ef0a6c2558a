"""benchmarks/pixelrec_table.py: the PixelRec-shaped table (models across, towers down), its "n/a" cells
(the refusal `pixelrec fit` gives), the per-cell result cache that reruns and parallel processes share,
and one tiny real table on the cold fixture dataset (1 epoch, dim 16)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_images import cold_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pixelrec_table as pt  # noqa: E402


def row(model, tower, seed, recall, ndcg, run="runs/x"):
    return {"model": model, "tower": tower, "seed": seed, "recall@10": recall, "ndcg@10": ndcg,
            "run": f"{run}/{model}-{tower}-seed{seed}"}


def test_layout_models_across_towers_down_with_mean_sd_links_and_na():
    cells = {("mf", "id"): pt.Cell("mf", "id", [row("mf", "id", 0, 0.10, 0.05), row("mf", "id", 1, 0.20, 0.07)]),
             ("mf", "frozen"): pt.Cell("mf", "frozen", [row("mf", "frozen", 0, 0.125, 0.0625)]),
             ("vbpr", "id"): pt.Cell("vbpr", "id", na="--model vbpr reads each item's frozen cached embedding"),
             ("vbpr", "frozen"): pt.Cell("vbpr", "frozen", pending=[0])}
    rows = pt.table_rows(cells, ["mf", "vbpr"], ["id", "frozen"], links=False)
    assert rows == [["tower", "metric", "mf", "vbpr"],
                    ["ID", "Recall@10", "0.1500 ± 0.0707", "n/a"],
                    ["ID", "NDCG@10", "0.0600 ± 0.0141", "n/a"],
                    ["frozen", "Recall@10", "0.1250", "–"],
                    ["frozen", "NDCG@10", "0.0625", "–"]]
    md = pt.markdown(pt.table_rows(cells, ["mf", "vbpr"], ["id", "frozen"], links=True, base=Path("runs")))
    lines = md.splitlines()
    assert lines[0] == "| tower | metric | mf | vbpr |" and lines[1] == "|---|---|---:|---:|"
    assert lines[2] == "| ID | Recall@10 | [0.1500 ± 0.0707](x/mf-id-seed0) [s1](x/mf-id-seed1) | n/a |"
    text = pt.plain(rows).splitlines()
    assert text[1].split() == ["ID", "Recall@10", "0.1500", "±", "0.0707", "n/a"]
    assert pt.na_notes(cells) == ["n/a vbpr/ID: --model vbpr reads each item's frozen cached embedding"]


def test_a_tower_the_model_does_not_offer_is_na_with_fits_refusal(tmp_path):
    cfg = pt.cell_config("vbpr", "id", 0, "x.csv", "c.h5", tmp_path / "run", {}, 0)
    assert "--model vbpr reads each item's frozen cached embedding" in pt.not_offered(cfg)
    assert pt.not_offered(pt.cell_config("vbpr", "frozen", 0, "x.csv", "c.h5", tmp_path / "r", {}, 0)) == ""
    assert pt.not_offered(pt.cell_config("mf", "id", 0, "x.csv", "c.h5", tmp_path / "r", {}, 0)) == ""


def test_cached_result_reused_only_with_the_same_settings(tmp_path):
    path = pt.result_path(tmp_path, "mf", "id", 0)
    settings = {"overrides": {"train.device": "cpu"}, "epochs_cap": 3, "data": "d.csv"}
    pt.write_json(path, {**row("mf", "id", 0, 0.3, 0.2), "settings": settings})
    assert pt.cached_row(path, settings)["ndcg@10"] == 0.2
    assert pt.cached_row(path, {**settings, "epochs_cap": 4}) is None
    assert pt.cached_row(pt.result_path(tmp_path, "mf", "id", 1), settings) is None


def test_claim_skips_a_cell_a_live_process_fits_and_takes_over_a_dead_ones(tmp_path):
    path = pt.result_path(tmp_path, "fm", "id", 0)
    assert pt.claim(path)  # ours now
    assert not pt.claim(path)  # held by a live process (this one)
    path.with_suffix(".lock").write_text("999999999")  # no such process
    assert pt.claim(path)
    assert path.with_suffix(".lock").read_text() == str(os.getpid())


def test_tiny_table_fits_each_cell_once_and_reruns_from_the_cache(tmp_path, capsys):
    data = cold_dataset()
    argv = [str(data.interactions), "--cache", str(data.cache()), "--out", str(tmp_path), "--models", "mf,vbpr",
            "--towers", "id,frozen", "--seeds", "0", "--epochs", "1", "--set", "model.dim=16",
            "--set", "model.max_len=10"]
    pt.main(argv)
    first = capsys.readouterr().out
    results = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "results").rglob("*.json"))
    assert results == ["results/mf/frozen-seed0.json", "results/mf/id-seed0.json", "results/vbpr/frozen-seed0.json"]
    saved = json.loads((tmp_path / "results/mf/id-seed0.json").read_text())
    assert saved["epochs"] == 1 and (tmp_path / "runs" / "mf-id-seed0").is_dir()
    assert f"| ID | NDCG@10 | [{saved['ndcg@10']:.4f}]({tmp_path}/runs/mf-id-seed0) | n/a |" in first
    assert "n/a vbpr/ID: --model vbpr reads" in first
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    pt.main(argv)
    second = capsys.readouterr().out
    assert "fitting" not in second and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert f"[{saved['ndcg@10']:.4f}]" in second


def test_a_killed_cell_continues_from_its_last_epoch_and_one_with_other_settings_starts_over(tmp_path, capsys):
    """A cell whose fit stopped after epoch 0 (killed: a checkpoint, no result row) is continued by the
    next run, not fitted again; the same leftover under other settings is fitted from the start."""
    from pixelrec.runs.fit import fit

    data = cold_dataset()
    overrides = {"model.dim": 16, "model.max_len": 10}
    run = pt.run_path(tmp_path, "mf", "id", 0)
    fit(pt.cell_config("mf", "id", 0, data.interactions, None, run, overrides, epochs=1))
    first_epoch = (run / "metrics.jsonl").read_text().splitlines()[0]
    argv = [str(data.interactions), "--cache", str(data.cache()), "--out", str(tmp_path), "--models", "mf",
            "--towers", "id", "--seeds", "0", "--epochs", "2", "--set", "model.dim=16", "--set", "model.max_len=10"]
    pt.main(argv)
    assert "mf/id seed 0: continued the killed fit" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results/mf/id-seed0.json").read_text())
    assert saved["epochs"] == 2 and saved["continued"] is True
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first_epoch  # epoch 0 kept (its timing too), epoch 1 trained now

    (tmp_path / "results/mf/id-seed0.json").unlink()  # the leftover run now has other settings than asked
    pt.main(argv[:-4] + ["--set", "model.dim=8", "--set", "model.max_len=10"])
    out = capsys.readouterr().out
    assert "mf/id seed 0: not continued" in out and "model.dim" in out
    saved = json.loads((tmp_path / "results/mf/id-seed0.json").read_text())
    assert saved["epochs"] == 2 and "continued" not in saved
    assert (run / "metrics.jsonl").read_text().splitlines()[0] != first_epoch


def test_bad_selection_is_refused_naming_the_option():
    with pytest.raises(SystemExit, match="--models: unknown nope"):
        pt.parse_list("sasrec,nope", ["sasrec"], "models")
    with pytest.raises(SystemExit):
        pt.main(["--synthetic", "0.1", "data.csv"])


# ------------------------------------------------------------------ peers: RecBole's BPR, Cornac's VBPR
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import cornac_vbpr  # noqa: E402
import recbole_run  # noqa: E402


def test_recbole_bpr_is_the_mf_peer_with_pairwise_loss_and_checked_targets():
    args = recbole_run.parse_args(["d.csv", "--model", "mf", "--lr", "0.01"])
    cfg = recbole_run.recbole_config("mf", args, Path("/tmp/x"), "pixelrec")
    assert (cfg["model"], cfg["loss_type"], cfg["learning_rate"]) == ("BPR", "BPR", 0.01)
    assert cfg["train_neg_sample_args"]["sample_num"] == 1 and cfg["eval_args"]["mode"] == "full"
    # a general model's full-sort batch: (row, held-out item) pairs in any order, one per row
    recbole_run.check_general_targets(np.array([1, 0, 2]), np.array([7, 5, 9]), [5, 7, 9])
    with pytest.raises(SystemExit, match="protocol mismatch"):
        recbole_run.check_general_targets(np.array([1, 0, 2]), np.array([7, 5, 9]), [5, 7, 8])
    with pytest.raises(SystemExit, match="protocol mismatch"):  # a row with two held-out items
        recbole_run.check_general_targets(np.array([0, 0, 1]), np.array([5, 6, 7]), [5, 7])


def test_cornac_peer_split_and_features_follow_pixelrec(tmp_path):
    import h5py
    import pandas as pd

    df = pd.DataFrame({"item_id": ["a", "b", "c", "d", "a", "b"], "user_id": ["u", "u", "u", "u", "v", "v"],
                       "timestamp": [4, 1, 1, 3, 1, 2]})
    train, users = cornac_vbpr.split(recbole_run.histories(df))
    assert users == {"u": ["b", "c", "d", "a"]}  # ties keep file order; v (2 rows) is left out
    assert train == [("u", "b", 1.0), ("u", "c", 1.0)]
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["item_ids"] = np.array([b"b", b"a"], dtype=object)
        f["embeddings"] = np.array([[1, 2], [3, 4]], dtype=np.float16)
    assert cornac_vbpr.read_features(str(tmp_path / "c.h5"), ["a", "b"]).tolist() == [[3, 4], [1, 2]]
    with pytest.raises(SystemExit, match="no embedding for item 'z'"):
        cornac_vbpr.read_features(str(tmp_path / "c.h5"), ["a", "z"])


def test_preset_gives_each_cell_the_models_reference_values_and_set_wins(tmp_path):
    cfg = pt.cell_config("fm", "id", 0, "x.csv", None, tmp_path / "r", {"train.lr": 0.5}, 0, preset="pixelrec")
    assert (cfg.model.dim, cfg.train.weight_decay, cfg.train.lr) == (4096, 0.1, 0.5)  # registry FM preset; --set lr
    assert pt.cell_config("fm", "id", 0, "x.csv", None, tmp_path / "r", {}, 0).model.dim != 4096
