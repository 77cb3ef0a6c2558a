"""The RecBole side-by-side harness's pure parts (benchmarks/ml100k.py, benchmarks/peers/recbole_run.py),
without RecBole installed: the peer's sequence order and history masking against pixelrec's split on a
hand case, its metrics, argument checks, result caching and the table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pixelrec.data.sequences import build_sequences

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import ml100k  # noqa: E402
import recbole_run  # noqa: E402

# user a: ties at t=5 keep file order (x before y); user b's rows are out of time order in the file.
# The times differ by less than float32 resolution at this magnitude (878542960 and ...961 are one float32).
HAND = pd.DataFrame({
    "item_id": ["x", "y", "w", "z", "v", "q", "x", "p", "r"],
    "user_id": ["a", "a", "b", "a", "b", "a", "b", "b", "b"],
    "timestamp": [5, 5, 878542961, 7, 878542960, 9, 878542962, 878542963, 878542964],
})


def test_peer_sequences_and_masked_history_match_pixelrec_split():
    seqs = recbole_run.histories(HAND)
    assert seqs == {"a": ["x", "y", "z", "q"], "b": ["v", "w", "x", "p", "r"]}
    ours = build_sequences(HAND)
    for u, user in enumerate(ours.user_ids):
        for split, back in (("valid", 2), ("test", 1)):
            mine = [ours.item_ids[i] for i in ours.history(u, split)]
            assert seqs[user][:-back] == mine  # what the peer masks = what pixelrec excludes
        assert seqs[user][-1] == ours.item_ids[ours.targets("test")[u]]
        assert seqs[user][-2] == ours.item_ids[ours.targets("valid")[u]]


def test_atomic_timestamps_keep_the_order_float32_would_merge(tmp_path):
    path = recbole_run.write_atomic(HAND, tmp_path, "hand")
    atomic = pd.read_csv(path, sep="\t")
    assert list(atomic.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    assert np.float32(878542960) == np.float32(878542961)  # why raw times would not do
    ts = atomic["timestamp:float"].to_numpy()
    assert len(set(ts.astype(np.float32).tolist())) == len(HAND)  # ranks stay distinct in float32
    b = atomic[atomic["user_id:token"] == "b"].sort_values("timestamp:float", kind="stable")
    assert b["item_id:token"].tolist() == ["v", "w", "x", "p", "r"]


def test_mask_history_and_rank_metrics_on_a_hand_case():
    scores = torch.tensor([[9.0, 5.0, 8.0, 1.0, 7.0, 0.5],
                           [9.0, 1.0, 6.0, 5.0, 4.0, 3.0]])
    masked = recbole_run.mask_history(scores.clone(), [np.array([2, 4]), np.array([2])])
    inf = -math.inf
    assert masked.tolist() == [[inf, 5.0, inf, 1.0, inf, 0.5], [inf, 1.0, inf, 5.0, 4.0, 3.0]]
    # row 0: target 3 has only item 1 above it (rank 1); row 1: target 1 has items 3, 4, 5 above (rank 3)
    ndcg, recall = recbole_run.rank_metrics(masked, torch.tensor([3, 1]))
    assert ndcg == pytest.approx([1 / math.log2(3), 1 / math.log2(5)])
    assert recall.tolist() == [1.0, 1.0]
    # unmasked, row 0's target would fall behind the history items 2 and 4 and the padding column
    ndcg, _ = recbole_run.rank_metrics(scores, torch.tensor([3, 1]))
    assert ndcg[0] == pytest.approx(1 / math.log2(6))


def test_rank_metrics_count_only_the_top_ten():
    scores = torch.arange(20, dtype=torch.float32).flip(0).view(1, -1)  # item i has rank i
    for target, want in ((0, 1.0), (9, 1 / math.log2(11)), (10, 0.0)):
        ndcg, recall = recbole_run.rank_metrics(scores, torch.tensor([target]))
        assert ndcg[0] == pytest.approx(want)
        assert recall[0] == (1.0 if target < 10 else 0.0)


def test_peer_script_arguments():
    args = recbole_run.parse_args(["d.csv", "--model", "lightsans", "--epochs", "3", "--max-len", "20"])
    assert (args.model, args.epochs, args.max_len, args.dim, args.patience) == ("lightsans", 3, 20, 64, 10)
    with pytest.raises(SystemExit):
        recbole_run.parse_args(["d.csv", "--model", "caser"])
    with pytest.raises(SystemExit):
        recbole_run.parse_args(["d.csv", "--model", "sasrec", "--epochs", "0"])
    cfg = recbole_run.recbole_config("sasrec", args, Path("/tmp/x"), "pixelrec")
    assert cfg["model"] == "SASRec" and cfg["MAX_ITEM_LIST_LENGTH"] == 20 and cfg["loss_type"] == "CE"
    assert cfg["eval_args"]["split"] == {"LS": "valid_and_test"} and cfg["eval_args"]["order"] == "TO"
    assert set(recbole_run.RECBOLE_MODELS) == set(ml100k.PEER_MODELS)


MODELS = ["sasrec", "gru4rec", "mf"]


def _args(*argv):
    return ml100k.parse_args(["d.csv", *argv], models=MODELS)


@pytest.mark.parametrize("argv, message", [
    (["--models", "sasrec,bert5rec"], "--models: unknown bert5rec"),
    (["--seeds", "0,one"], "--seeds '0,one': expected comma-separated integers"),
    (["--peer-seeds", "-1"], "--peer-seeds '-1': seeds are 0 or more"),
    (["--peer-epochs", "0"], "--peer-epochs must be at least 1"),
    (["--peer-max-minutes", "-2"], "--peer-max-minutes must be 0"),
    (["--peer-only"], "--peer-only needs --peer recbole"),
    (["--peer", "recbole", "--peer-venv", "/nonexistent/venv"], "make_recbole_venv.sh /nonexistent/venv"),
])
def test_benchmark_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        _args(*argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_arguments_and_peer_command(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    args = _args("--models", "all", "--seeds", "0,1,2", "--peer", "recbole", "--peer-venv", str(venv),
                 "--peer-seeds", "0", "--peer-epochs", "5", "--peer-max-minutes", "1.5")
    assert args.models == MODELS and args.seeds == [0, 1, 2] and args.peer_seeds == [0]
    cmd = ml100k.peer_command(args, "sasrec", 0, max_len=20, dim=64, patience=10)
    assert cmd[0] == str(venv / "bin" / "python") and cmd[1].endswith("peers/recbole_run.py")
    assert cmd[3:] == ["--model", "sasrec", "--seed", "0", "--epochs", "5", "--max-len", "20", "--dim", "64",
                       "--patience", "10", "--max-seconds", "90"]
    assert recbole_run.parse_args(cmd[2:]).max_seconds == 90  # the peer script reads what the harness writes
    assert _args("--seeds", "3").peer_seeds == [3]  # the peer's seeds default to ours


def test_cached_results_are_reused_only_for_the_same_settings(tmp_path):
    path = tmp_path / "results" / "recbole-sasrec-seed0.json"
    key = {"cmd": ["--epochs", "5"], "csv": ["ml100k.csv", 123]}
    ml100k._write_json(path, {"ndcg@10": 0.1, "key": key})
    assert ml100k._cached(path, key, refit=False)["ndcg@10"] == 0.1
    assert ml100k._cached(path, {**key, "cmd": ["--epochs", "6"]}, refit=False) is None
    assert ml100k._cached(path, key, refit=True) is None
    assert not list(path.parent.glob("*.tmp"))


def _row(side, model, seed, n, r, s, capped=False):
    return {"side": side, "model": model, "seed": seed, "ndcg@10": n, "recall@10": r, "s_per_epoch": s,
            "best_epoch": 3, "epochs": 10, "capped": capped}


def test_table_prints_means_and_ratios_ours_over_peer():
    ours = [_row("pixelrec", "sasrec", s, n, r, 2.0) for s, n, r in ((0, 0.10, 0.20), (1, 0.12, 0.22), (2, 0.11, 0.21))]
    ours.append(_row("pixelrec", "gru4rec", 0, 0.09, 0.25, 1.0))
    peers = [_row("recbole", "sasrec", 0, 0.10, 0.20, 8.0), _row("recbole", "gru4rec", 0, 0.10, 0.20, 4.0, True)]
    lines = ml100k.table(ours, peers, ["sasrec", "gru4rec", "fm"])
    text = "\n".join(lines)
    assert "pixelrec sasrec    mean 3        0.1100     0.2100" in text
    assert "ours/RecBole: NDCG@10 1.100, Recall@10 1.050, s/epoch 0.250; mean meets RecBole's on both metrics" in text
    assert ("ours/RecBole: NDCG@10 0.900, Recall@10 1.250, s/epoch 0.250; mean below RecBole's on NDCG@10"
            " (RecBole capped)") in text
    assert "capped" in [ln for ln in lines if ln.startswith("RecBole  gru4rec")][0]
    assert "(no RecBole counterpart of fm is run)" in text
    summary = ml100k.summary([r for r in ours if r["model"] == "sasrec"])
    assert summary["ndcg@10_sd"] == pytest.approx(0.01)


def test_peer_checks_recbole_inputs_against_our_split():
    class Names:  # the field names a RecBole SequentialRecommender carries
        ITEM_SEQ, ITEM_SEQ_LEN, ITEM_ID = "item_id_list", "item_length", "item_id"

    inter = {"item_id_list": torch.tensor([[3, 4, 5], [7, 0, 0]]), "item_length": torch.tensor([3, 1]),
             "item_id": torch.tensor([6, 8])}
    # left-aligned, cut to the newest 3 items of a longer history; a one-item history padded after it
    recbole_run.check_inputs(inter, Names, [np.array([1, 2, 3, 4, 5]), np.array([7])], [6, 8])
    with pytest.raises(SystemExit, match="row 0: RecBole's sequence/target differ"):
        recbole_run.check_inputs(inter, Names, [np.array([1, 2, 4, 3, 5]), np.array([7])], [6, 8])
    with pytest.raises(SystemExit, match="row 1"):
        recbole_run.check_inputs(inter, Names, [np.array([3, 4, 5]), np.array([7])], [6, 9])


def test_cached_results_fitted_under_other_defaults_are_found(tmp_path):
    """A result cached by a benchmark is today's only if its run recorded the settings a fit would use now:
    a changed default (NextItNet's stride was 3) is named; unread (null) settings and the device are not."""
    from run_settings import changed_settings

    from pixelrec.recommend.config import FitConfig

    cfg = FitConfig(interactions="ml100k.csv", out=str(tmp_path / "run"))
    cfg.model.model = "nextitnet"
    now = FitConfig.from_dict(cfg.to_dict())
    now.validate()
    recorded = now.to_dict()
    recorded["model"]["heads"] = None  # not read by nextitnet: recorded as null
    recorded["train"]["device"] = "cuda"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": recorded}))
    assert changed_settings(cfg, tmp_path / "run") == []
    mf = FitConfig(interactions="ml100k.csv", out=str(tmp_path / "mf"))
    mf.model.model = "mf"  # reads no --layers: unset now, though older runs recorded the default 1
    old_mf = FitConfig.from_dict(mf.to_dict())
    old_mf.validate()
    old_record = old_mf.to_dict()
    assert old_record["model"]["layers"] is None
    old_record["model"]["layers"] = 1
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "config.json").write_text(json.dumps({"config": old_record}))
    assert changed_settings(mf, tmp_path / "mf") == []
    old_record["train"]["lr"] = 1e-3  # a default of its own that moved: found
    (tmp_path / "mf" / "config.json").write_text(json.dumps({"config": old_record}))
    assert changed_settings(mf, tmp_path / "mf") == ["train.lr: 0.001 recorded, 0.01 now"]
    recorded["train"]["stride"] = 3
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": recorded}))
    assert changed_settings(cfg, tmp_path / "run") == ["train.stride: 3 recorded, 1 now"]
    assert cfg.train.stride == 0  # the caller's config is left as given (resolved on a copy)
    assert changed_settings(cfg, tmp_path / "missing") == ["no config.json"]
