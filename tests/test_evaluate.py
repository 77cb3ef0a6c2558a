"""Evaluation (SPEC §7): FAISS metrics equal a brute-force torch evaluation exactly; cold/warm and
popularity breakdowns; the sampled protocol; approximate indexes; `evaluate_run` and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures_runs import (
    handmade_dataset,
    handmade_run,
    invoke,
    trained_run,
)
from pixelrec.errors import PixelrecError
from pixelrec.index.evaluate import evaluate_model
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.recommend.build import build_recommender
from pixelrec.recommend.config import FitConfig
from pixelrec.runs.rundir import RunDir

KS = (5, 10, 20)


def _trained_model(run_dir):
    """The full model (item tower included) with the run's best weights."""
    run = RunDir(run_dir)
    cfg = FitConfig.from_dict(run.read_config()["config"])
    data = run.read_data()
    model = build_recommender(cfg, data)
    model.load_state_dict(run.load_checkpoint(run.published().checkpoint)["model"])
    return model.eval(), data


@torch.no_grad()
def brute_force(model, data, split: str, ks=KS) -> tuple[dict, np.ndarray]:
    """Full ranking by torch matmul: history and padding at -inf; rank = items scoring higher."""
    table = model.tower.all_vectors()  # [N + 1, d]
    L, U = model.max_len, data.num_users
    seq = torch.zeros(U, L, dtype=torch.long)
    hists = []
    for u in range(U):
        seqs = data.sequence(u)
        h = seqs[:-2] if split == "valid" else seqs[:-1]
        hists.append(h)
        h = torch.from_numpy(np.asarray(h[-L:], dtype=np.int64))
        seq[u, L - len(h):] = h
    user_vecs = model.encoder(table[seq], seq != 0)[:, -1]  # state after the last item
    scores = user_vecs @ table.T  # [U, N + 1]
    scores[:, 0] = -torch.inf
    for u, h in enumerate(hists):
        scores[u, torch.from_numpy(np.asarray(h, dtype=np.int64))] = -torch.inf
    targets = torch.from_numpy(np.array([data.sequence(u)[-2 if split == "valid" else -1] for u in range(U)]))
    target_scores = scores[torch.arange(U), targets]
    ranks = (scores > target_scores[:, None]).sum(1).numpy()
    ranks = np.where(torch.isneginf(target_scores).numpy(), 10**9, ranks)  # target in the history: a miss
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(np.mean(hit.astype(np.float64)))
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)))
    out["users"] = U
    return out, ranks


@pytest.mark.parametrize("which,split", [("synth", "test"), ("synth", "valid"), ("handmade", "test")])
def test_flat_metrics_equal_brute_force_exactly(which, split):
    run_dir = (trained_run if which == "synth" else handmade_run)()[0]
    model, data = _trained_model(run_dir)
    report = evaluate_model(model, data, split, ks=KS)
    want, ranks = brute_force(model, data, split)
    assert report["overall"] == want  # exact equality, not approx
    assert report["index"] == {"spec": "Flat", "exact": True}
    assert report["split"] == split and report["users"] == data.num_users
    assert 0 < report["overall"]["recall@20"] < 1  # a non-trivial case
    if which == "handmade":  # the user whose test target repeats an earlier item always misses
        u = data.user_index[handmade_dataset().repeat_user]
        assert ranks[u] == 10**9


@pytest.mark.smoke
def test_fit_results_equal_evaluation_from_stored_vectors():
    run_dir, result = trained_run()
    stored = json.loads((run_dir / "results.json").read_text())
    report = evaluate_run(str(run_dir))
    for part in ("overall", "cold", "warm", "buckets"):
        assert report[part] == stored[part], part
    assert report["run"]["items"] == "id" and report["run"]["model"] == "sasrec"
    model, data = _trained_model(run_dir)
    assert report["overall"] == brute_force(model, data, "test")[0]


def test_cold_warm_and_popularity_breakdown():
    run_dir, _ = handmade_run()
    hm = handmade_dataset()
    report = evaluate_run(str(run_dir))
    counts = hm.train_counts()
    targets = {u: s[-1] for u, s in hm.sequences.items()}
    cold_users = [u for u, t in targets.items() if counts[t] == 0]
    # the users whose final item is one of the cold items are among the cold ones
    assert {u for u, t in targets.items() if t in hm.cold_items} <= set(cold_users)
    assert len([u for u, t in targets.items() if t in hm.cold_items]) == 9
    assert report["cold"]["users"] == len(cold_users)
    assert report["cold"]["users"] + report["warm"]["users"] == report["users"] == 40
    assert report["cold_threshold"] == 1
    buckets = report["buckets"]
    assert sum(b["users"] for b in buckets.values()) == 40
    want = {"cold (0)": 0, "1-9": 0, "10-99": 0}
    for t in targets.values():
        want["cold (0)" if counts[t] == 0 else "1-9" if counts[t] < 10 else "10-99"] += 1
    assert {k: buckets[k]["users"] for k in want} == want
    assert buckets["cold (0)"]["users"] == report["cold"]["users"]
    # the id model has never trained the cold items' embeddings: it says so
    assert any("no training interactions" in n for n in report.get("notes", []))
    # weighted mean of cold and warm = overall
    for k in KS:
        c, w = report["cold"], report["warm"]
        mix = (c[f"recall@{k}"] * c["users"] + w[f"recall@{k}"] * w["users"]) / 40
        assert mix == pytest.approx(report["overall"][f"recall@{k}"])

    higher = evaluate_run(str(run_dir), cold_threshold=3)
    assert higher["cold"]["users"] == sum(counts[t] < 3 for t in targets.values())


class _FixedQueries:
    """Stands in for a model: returns given user vectors (to control every score)."""

    def __init__(self, queries):
        self.queries = np.asarray(queries, dtype=np.float32)

    def eval(self):
        return self

    def encode_histories(self, histories, item_table=None, batch_size=1024, users=None):
        assert len(histories) == len(self.queries)
        return self.queries


def test_sampled_protocol_never_samples_the_users_items():
    data = RunDir(handmade_run()[0]).read_data()
    n = data.num_items
    table = torch.zeros(n + 1, n + 1)
    table[1:, 1:] = torch.eye(n)  # one-hot items: score(item i) = query[i]
    queries = np.zeros((data.num_users, n + 1), dtype=np.float32)
    for u in range(data.num_users):
        seq = data.sequence(u)
        queries[u, seq] = 10.0  # the user's own items would outrank the target...
        queries[u, seq[-1]] = 1.0  # ...which scores 1; every other item scores 0
    # the repeat user's target is also an earlier item: still scores 1, the rest of the history 10
    report = evaluate_model(_FixedQueries(queries), data, "test", ks=(1, 5), negatives=5, table=table)
    assert report["protocol"].startswith("sampled")
    assert report["overall"]["recall@1"] == 1.0  # no negative is ever one of the user's items

    too_many = data.num_items - min(len(set(data.sequence(u).tolist())) for u in range(data.num_users)) + 1
    with pytest.raises(PixelrecError, match="--negatives"):
        evaluate_model(_FixedQueries(queries), data, "test", negatives=too_many, table=table)


def test_sampled_protocol_is_seeded_and_sane():
    run_dir, _ = trained_run()
    full = evaluate_run(str(run_dir))
    a = evaluate_run(str(run_dir), negatives=9, seed=1)
    b = evaluate_run(str(run_dir), negatives=9, seed=1)
    c = evaluate_run(str(run_dir), negatives=50, seed=2)
    assert a["overall"] == b["overall"]
    assert a["overall"]["recall@10"] == 1.0  # the target and 9 negatives: always in the top 10
    assert a["overall"]["ndcg@10"] < 1.0
    assert "9 random non-interacted" in a["protocol"]
    for k in KS:  # a sample of the catalogue ranks the target no lower than the full catalogue
        assert c["overall"][f"recall@{k}"] >= full["overall"][f"recall@{k}"]
    assert evaluate_run(str(run_dir), negatives=50, seed=3)["overall"] != c["overall"]  # the seed matters


def test_sampled_protocol_with_random_scores_is_near_chance():
    run_dir = handmade_run()[0]
    data = RunDir(run_dir).read_data()
    rng = np.random.default_rng(0)
    n = data.num_items
    table = torch.from_numpy(rng.normal(size=(n + 1, 8)).astype(np.float32))
    table[0] = 0
    queries = rng.normal(size=(data.num_users, 8)).astype(np.float32)
    report = evaluate_model(_FixedQueries(queries), data, "test", ks=(1, 5, 10), negatives=9, table=table, seed=0)
    assert report["overall"]["recall@10"] == 1.0
    assert 0.0 < report["overall"]["recall@5"] < 1.0


def test_approximate_index_reports_recall_against_exact():
    run_dir, _ = trained_run()
    exact = evaluate_run(str(run_dir))
    full_probe = evaluate_run(str(run_dir), index_spec="IVF4,Flat", index_options={"nprobe": 4})
    idx = full_probe["index"]
    assert idx["exact"] is False and idx["spec"] == "IVF4,Flat" and idx["nprobe"] == 4
    assert idx["recall_vs_exact@10"] == 1.0 and idx["recall_vs_exact@20"] == 1.0
    for part in ("overall", "cold", "warm"):
        assert full_probe[part] == pytest.approx(exact[part]), part

    one_probe = evaluate_run(str(run_dir), index_spec="IVF4,Flat", index_options={"nprobe": 1})
    assert one_probe["index"]["nprobe"] == 1
    for k in KS:
        assert 0.0 < one_probe["index"][f"recall_vs_exact@{k}"] <= 1.0


def test_cli_evaluate_json_matches_results_json():
    run_dir, _ = trained_run()
    r = invoke(["evaluate", run_dir, "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"overall", "cold", "warm", "buckets", "protocol", "index", "run", "split"} <= set(report)
    stored = json.loads((run_dir / "results.json").read_text())
    for part in ("overall", "cold", "warm", "buckets"):
        assert report[part] == stored[part]

    r = invoke(["evaluate", run_dir, "--split", "valid", "--k", "1,3", "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["split"] == "valid" and set(report["overall"]) == {"recall@1", "ndcg@1", "recall@3", "ndcg@3", "users"}

    r = invoke(["evaluate", run_dir])  # the table
    assert r.exit_code == 0
    assert "split test" in r.stdout and "cold" in r.stdout and "warm" in r.stdout and "R@10" in r.stdout

    r = invoke(["evaluate", run_dir, "--k", "0,5"])
    assert r.exit_code == 2 and "positive" in r.stderr


def test_cli_evaluate_json_is_clean_without_quiet():
    """--json output must parse even when status lines are printed (they belong on stderr)."""
    run_dir, _ = trained_run()
    r = invoke(["evaluate", run_dir, "--json", "--spec", "IVF4,Flat", "--nprobe", "4"], quiet=False)
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["index"]["recall_vs_exact@10"] == 1.0
