"""Retrieval (SPEC §4 retrieve, §8) and index management (`pixelrec index`) on a trained run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_runs import (
    assert_one_line_error,
    copy_run,
    invoke,
    read_jsonl,
    synth_dataset,
    trained_run,
)
from pixelrec.errors import PixelrecError
from pixelrec.runs import retrieve as retrieve_mod
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.runs.item_index import rebuild_run_index
from pixelrec.runs.retrieve import retrieve_batch, retrieve_one
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.trained import load_trained


def _index(run: Path) -> Path:
    return RunDir(run).published().index_dir


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()[0]


@pytest.fixture(scope="module")
def trained(run_dir):
    return load_trained(str(run_dir))


def _user_sequence(trained, user: str) -> list[str]:
    u = trained.data.user_index[user]
    return [str(trained.data.item_ids[i]) for i in trained.data.sequence(u)]


@torch.no_grad()
def _brute_top(trained, history: list[str], k: int) -> list[str]:
    idx = torch.tensor([trained.data.item_index[h] for h in history][-trained.cfg.model.max_len:])
    seq = torch.zeros(1, trained.cfg.model.max_len, dtype=torch.long)
    seq[0, seq.shape[1] - len(idx):] = idx
    user = trained.model.encoder(trained.table[seq], seq != 0)[:, -1]
    scores = (user @ trained.table.T)[0]
    scores[0] = -torch.inf
    scores[idx] = -torch.inf
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    return [str(trained.item_names[i]) for i in top]


@pytest.mark.smoke
def test_retrieve_one_user_excludes_history_and_sorts(run_dir, trained):
    user = str(trained.data.user_ids[7])
    seq = _user_sequence(trained, user)
    result = retrieve_one(str(run_dir), user=user, k=15)
    assert result.user_id == user and result.history == seq  # the whole history, test item included
    assert len(result.items) == len(result.scores) == 15
    assert len(set(result.items)) == 15
    assert not set(result.items) & set(seq)
    assert result.scores == sorted(result.scores, reverse=True)
    assert result.items == _brute_top(trained, seq, 15)

    by_history = retrieve_one(str(run_dir), history=seq, k=15)
    assert by_history.items == result.items and by_history.scores == result.scores
    assert by_history.user_id is None


def test_retrieve_history_rules(run_dir, trained):
    names = [str(n) for n in trained.data.item_ids[1:]]
    short = retrieve_one(str(run_dir), history=[names[3], names[10]], k=5)
    assert names[3] not in short.items and names[10] not in short.items and len(short.items) == 5

    with pytest.raises(PixelrecError, match="no_such_item"):
        retrieve_one(str(run_dir), history=[names[0], "no_such_item"], k=5)
    with pytest.raises(PixelrecError, match="nobody"):
        retrieve_one(str(run_dir), user="nobody", k=5)
    with pytest.raises(PixelrecError, match="empty"):
        retrieve_one(str(run_dir), history=[" "], k=5)
    with pytest.raises(PixelrecError, match="k=81"):
        retrieve_one(str(run_dir), user=str(trained.data.user_ids[0]), k=81)

    # a history covering almost the whole catalogue leaves fewer than k items: padded rows are dropped
    everything = retrieve_one(str(run_dir), history=names[:-3], k=10)
    assert sorted(everything.items) == sorted(names[-3:])


def test_retrieve_batch_matches_single_queries(tmp_path, run_dir, trained):
    users = [str(u) for u in trained.data.user_ids]
    wanted = [users[5], "ghost1", users[0], users[42], "ghost2", users[5]]
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(wanted) + "\n\n")
    out = tmp_path / "out" / "recs.jsonl"
    summary = retrieve_batch(str(run_dir), str(users_file), k=7, out=str(out))
    assert summary.served == 4 and summary.unknown == ["ghost1", "ghost2"]
    rows = read_jsonl(out)
    assert [r["user_id"] for r in rows] == [users[5], users[0], users[42], users[5]]  # file order
    for r in rows:
        one = retrieve_one(str(run_dir), user=r["user_id"], k=7)
        assert r["items"] == one.items and r["scores"] == one.scores
    assert not [p for p in out.parent.iterdir() if p.name != "recs.jsonl"], "temporary files left"


def test_retrieve_batch_all_users_and_empty_file(tmp_path, run_dir, trained):
    out = tmp_path / "all.jsonl"
    summary = retrieve_batch(str(run_dir), "all", k=3, out=str(out), batch_size=64)  # several batches
    rows = read_jsonl(out)
    assert summary.served == len(rows) == trained.data.num_users and summary.unknown == []
    assert [r["user_id"] for r in rows] == [str(u) for u in trained.data.user_ids]
    u = 123
    seq = set(_user_sequence(trained, rows[u]["user_id"]))
    assert len(rows[u]["items"]) == 3 and not seq & set(rows[u]["items"])

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PixelrecError) as err:
        retrieve_batch(str(run_dir), str(empty), out=str(tmp_path / "e.jsonl"))
    assert str(empty) in str(err.value)
    assert not (tmp_path / "e.jsonl").exists()
    with pytest.raises(PixelrecError, match="missing.txt"):
        retrieve_batch(str(run_dir), str(tmp_path / "missing.txt"))


def test_retrieve_batch_writes_atomically(tmp_path, run_dir, trained, monkeypatch):
    real_stream = retrieve_mod._stream

    def failing_stream(trained_run, batches, index, k, f):
        real_stream(trained_run, [batches[0][:3]], index, k, f)  # some lines are written...
        raise RuntimeError("disk full")  # ...then the write fails

    monkeypatch.setattr(retrieve_mod, "_stream", failing_stream)
    out = tmp_path / "o" / "recs.jsonl"
    with pytest.raises(RuntimeError, match="disk full"):
        retrieve_batch(str(run_dir), "all", k=5, out=str(out))
    assert not out.exists()
    assert list(out.parent.iterdir()) == []

    # an existing output stays as it was when the new write fails
    out.write_text("previous\n")
    with pytest.raises(RuntimeError):
        retrieve_batch(str(run_dir), "all", k=5, out=str(out))
    assert out.read_text() == "previous\n"


def test_cli_retrieve(tmp_path, run_dir, trained):
    user = str(trained.data.user_ids[3])
    r = invoke(["retrieve", run_dir, "--user", user, "--k", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == retrieve_one(str(run_dir), user=user, k=4).to_dict()

    r = invoke(["retrieve", run_dir, "--user", user, "--k", "4"])
    assert r.exit_code == 0 and f"top 4 for user {user}" in r.stdout
    assert got["items"][0] in r.stdout.splitlines()[1]

    r = invoke(["retrieve", run_dir, "--user", "nobody"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "nobody")
    r = invoke(["retrieve", run_dir, "--history", f"{got['items'][0]},bogus_item"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "bogus_item")
    r = invoke(["retrieve", run_dir, "--user", user, "--history", got["items"][0]])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--user", "--history")
    r = invoke(["retrieve", run_dir])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "exactly one")
    r = invoke(["retrieve", run_dir, "--user", user, "--k", "1000"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "k=1000")

    users_file = tmp_path / "u.txt"
    users_file.write_text(f"{user}\nghost\n")
    r = invoke(["retrieve", run_dir, "--users", users_file, "--k", "2"])  # JSONL on stdout
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["user_id"] for row in rows] == [user] and len(rows[0]["items"]) == 2
    assert "1 unknown" in r.stderr and "ghost" in r.stderr

    r = invoke(["retrieve", run_dir, "--users", "-", "--k", "2"], input=f"{user}\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["user_id"] == user


# ---------------------------------------------------------------------------------------- index
def test_index_rebuild_with_hnsw_then_evaluate_and_retrieve(tmp_path, run_dir, trained):
    run = copy_run(run_dir, tmp_path / "run")
    before = evaluate_run(str(run))
    r = invoke(["index", run, "--spec", "HNSW16", "--ef-search", "80"])
    assert r.exit_code == 0, r.stderr
    assert "HNSW16" in r.stdout and "80 items" in r.stdout and "ef_search=80" in r.stdout
    meta = json.loads((_index(run) / "index.json").read_text())
    assert meta["spec"] == "HNSW16" and meta["exact"] is False and meta["ntotal"] == 80
    after = evaluate_run(str(run))  # full-ranking metrics stay exact whatever the serving index
    for part in ("overall", "cold", "warm", "buckets"):
        assert after[part] == before[part]
    user = str(trained.data.user_ids[0])
    got = retrieve_one(str(run), user=user, k=5)
    assert len(got.items) == 5 and not set(got.items) & set(_user_sequence(trained, user))


def test_index_with_the_ip_to_l2_reduction_serves_the_exact_items_when_every_list_is_probed(tmp_path, run_dir,
                                                                                             trained):
    run = copy_run(run_dir, tmp_path / "run")
    user = str(trained.data.user_ids[3])
    exact = retrieve_one(str(run), user=user, k=8)
    r = invoke(["index", run, "--spec", "IP2L2,IVF4,Flat", "--nprobe", "4"])
    assert r.exit_code == 0, r.stderr
    meta = json.loads((_index(run) / "index.json").read_text())
    assert meta["spec"] == "IP2L2,IVF4,Flat" and meta["dim"] == trained.index.dim and meta["ip2l2_radius"] > 0
    got = retrieve_one(str(run), user=user, k=8)
    assert got.items == exact.items  # same items, same order: scores are the exact inner products
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-5, atol=1e-6)
    r = invoke(["index", run, "--spec", "IP2L2,"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "IP2L2, must be followed by a FAISS spec")


def test_index_bad_spec_is_a_one_line_error(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path / "run")
    before = RunDir(run).read_manifest()
    r = invoke(["index", run, "--spec", "IVFbanana"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "IVFbanana")
    assert RunDir(run).read_manifest() == before  # the published index is untouched
    assert [p.name for p in (run / "index").iterdir()] == ["v0001"]  # and nothing half-made is left
    r = invoke(["index", run, "--spec", "IVF4096,Flat"])  # more lists than items
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "IVF4096")


def test_corrupt_index_is_named(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path / "run")
    path = _index(run) / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = invoke(["evaluate", run])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(path))
    r = invoke(["retrieve", run, "--user", "u0"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(path))
    # rebuilding from the stored vectors repairs it
    r = invoke(["index", run])
    assert r.exit_code == 0, r.stderr
    assert invoke(["evaluate", run]).exit_code == 0


def test_deleted_index_is_recomputed_from_the_checkpoint(tmp_path, run_dir, trained):
    run = copy_run(run_dir, tmp_path / "run")
    vectors = np.load(_index(run) / "item_vectors.npy")
    user = str(trained.data.user_ids[11])
    want = retrieve_one(str(run), user=user, k=6)
    shutil.rmtree(run / "index")

    r = invoke(["retrieve", run, "--user", user])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "pixelrec index")

    r = invoke(["index", run])
    assert r.exit_code == 0, r.stderr
    assert "Flat" in r.stdout and "80 items" in r.stdout
    np.testing.assert_array_equal(np.load(_index(run) / "item_vectors.npy"), vectors)
    assert retrieve_one(str(run), user=user, k=6) == want
    stored = json.loads((run / "results.json").read_text())
    assert evaluate_run(str(run))["overall"] == stored["overall"]


def test_rebuild_refuses_other_versions(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path / "run")
    meta = json.loads((run / "config.json").read_text())
    meta["pixelrec_version"] = "99.0.0"
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PixelrecError, match="99.0.0"):
        rebuild_run_index(str(run))


def test_synth_cold_items_exist_in_the_index(run_dir, trained):
    """Cold items (never trained) are still retrievable candidates of the full catalogue."""
    cold = set(synth_dataset().cold_item_ids)
    assert cold and cold <= {str(n) for n in trained.item_names[1:]}
    assert trained.index.ntotal == trained.data.num_items == 80


def test_an_index_of_another_dimension_is_refused_then_recomputed(tmp_path, run_dir, trained):
    """An index/ whose vectors do not fit the run's model (e.g. copied from another run) is refused by
    name, and `pixelrec index` recomputes it from the checkpoint instead of reusing the bad vectors."""
    from fixtures_runs import synth_dataset, tiny_config
    from pixelrec.runs.fit import fit

    other = tmp_path / "other"
    fit(tiny_config(synth_dataset().interactions, other, epochs=1, dim=8, heads=1))
    run = copy_run(run_dir, tmp_path / "run")
    user = str(trained.data.user_ids[3])
    want = retrieve_one(str(run), user=user, k=5)
    for p in _index(other).iterdir():
        (_index(run) / p.name).write_bytes(p.read_bytes())

    r = invoke(["retrieve", run, "--user", user])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "8-dimensional", "--dim 16")

    r = invoke(["index", run])
    assert r.exit_code == 0, r.stderr
    assert retrieve_one(str(run), user=user, k=5) == want
