"""The ViNet baselines over the encode cache: ACF (attention over the history and over each history
item's cached tokens) and VisRank (training-free: top-k mean cosine similarity to the history)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_images import TINY_VIT, cold_dataset
from fixtures_runs import assert_fit_evaluate_retrieve_history, invoke, one_error_line, popularity_ndcg, session_root, tiny_config
from pixelrec.data.sequences import load_sequences
from pixelrec.errors import PixelrecError
from pixelrec.index.visrank import VisRank
from pixelrec.recommend.config import SequenceConfig
from pixelrec.recommend.models.acf import ACF
from pixelrec.runs.fit import fit
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.trained import load_trained


@functools.lru_cache(maxsize=None)
def pooled_only_cache() -> Path:
    """cold_dataset()'s covers encoded without tokens (no --split-block)."""
    from pixelrec.encode.encoder import EncoderConfig
    from pixelrec.encode.pipeline import EncodeConfig, encode_images

    ds = cold_dataset()
    out = session_root() / "vinet_pooled.h5"
    if not out.exists():
        encode_images(EncodeConfig(images=str(ds.covers), out=str(out),
                                   encoder=EncoderConfig(model=TINY_VIT), num_workers=0, device="cpu", batch_size=64))
    return out


def acf_config(out, **over):
    ds = cold_dataset()
    cfg = tiny_config(ds.interactions, out, model="acf", epochs=4, lr=1e-2, dropout=0.0)
    cfg.items.cache = str(ds.cache())
    for key, value in over.items():
        cfg.set(key, value)
    return cfg


@functools.lru_cache(maxsize=None)
def acf_run():
    return fit(acf_config(session_root() / "vinet_acf").validate())


def small_acf(items=6, tokens=3, width=5, dim=4, users=2) -> ACF:
    torch.manual_seed(0)
    acf = ACF(SequenceConfig(model="acf", dim=dim, dropout=0.0), users)
    acf.attach_tokens(torch.randn(items + 1, tokens, width))
    with torch.no_grad():
        for p in acf.parameters():
            p.normal_()  # not the initial values: every weight must count
    return acf.eval()


# ------------------------------------------------------------------------------ ACF by hand
def test_acf_attention_weights_sum_to_one_and_skip_padding_and_later_items():
    acf = small_acf()
    items = torch.tensor([[0, 0, 3, 1, 5], [0, 2, 4, 4, 6]])
    x, mask = torch.randn(2, 5, 4), items != 0
    e_u = acf.user_embedding.weight
    alpha = acf.item_attention(x, mask, items, e_u)  # [2, t, j]
    assert torch.allclose(alpha.sum(-1)[mask], torch.ones(int(mask.sum())))
    assert (alpha[0, :2] == 0).all()  # positions with no real item up to them: no weights at all
    assert (alpha[~mask[:, None, :].expand_as(alpha)] == 0).all()  # padding is never attended
    assert (alpha.triu(1) == 0).all()  # nor an item after the position (causal)
    beta, _ = acf.component_attention(items, e_u)
    assert beta.shape == (2, 5, 3) and torch.allclose(beta.sum(-1), torch.ones(2, 5))
    # the state is e_u + the attention-weighted sum of the item vectors, whatever a padding slot holds
    x2 = x.clone()
    x2[0, :2] = 100.0
    states = acf.states_of(x2, mask, items, e_u)
    assert torch.allclose(states, e_u[:, None] + alpha @ x, atol=1e-5)
    assert torch.allclose(states[0, 4], e_u[0] + (alpha[0, 4, 2:, None] * x[0, 2:]).sum(0), atol=1e-5)


def test_acf_component_attention_reads_the_items_tokens():
    acf = small_acf()
    items = torch.tensor([[1, 2]])
    e_u = acf.user_embedding.weight[:1]
    before = acf.component_features(items, e_u)
    acf.tokens[2] = acf.tokens[2] * -3 + 1  # another cover for item 2
    after = acf.component_features(items, e_u)
    assert torch.equal(before[0, 0], after[0, 0]) and not torch.allclose(before[0, 1], after[0, 1])


# ------------------------------------------------------------------------------ ACF trained
def test_acf_trains_and_beats_popularity():
    res = acf_run()
    losses = [json.loads(line)["train_loss"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses
    data = load_sequences(str(cold_dataset().interactions))
    assert res.test["overall"]["ndcg@10"] > popularity_ndcg(data) + 0.03


def test_acf_run_serves_learned_users_and_folds_in_others():
    trained = load_trained(str(acf_run().run_dir))  # no cache needed: the tokens are saved with the run
    model, data, table = trained.model, trained.data, trained.table
    assert model.encoder.tokens.shape[0] == data.num_items + 1
    histories = [data.history(u, "valid") for u in range(data.num_users)]  # the items ACF trained on
    users = np.arange(data.num_users)
    learned = model.encode_histories(histories, item_table=table, users=users)
    folded = model.encode_histories(histories, item_table=table)  # no users: every e_u folded in
    assert np.array_equal(folded[:5], model.encode_histories(histories[:5], item_table=table))  # deterministic
    assert not np.allclose(learned, folded)
    another = model.encode_histories(histories, item_table=table, users=np.roll(users, 1))  # a wrong e_u

    def top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
        sa, sb = a @ table.numpy().T, b @ table.numpy().T
        shared = []
        for u, hist in enumerate(histories):
            sa[u, [0, *hist]] = sb[u, [0, *hist]] = -np.inf
            shared.append(len(set(np.argsort(-sa[u])[:10]) & set(np.argsort(-sb[u])[:10])) / 10)
        return float(np.mean(shared))

    # measured 0.83; another user's learned e_u over the same history: 0.72
    folded_overlap, wrong_overlap = top10_overlap(learned, folded), top10_overlap(learned, another)
    assert folded_overlap >= 0.75 and folded_overlap > wrong_overlap, (folded_overlap, wrong_overlap)


# ------------------------------------------------------------------------------ refusals
def test_acf_refusals(tmp_path):
    with pytest.raises(PixelrecError, match=r"--model acf .* --cache CACHE.h5 .*pixelrec encode .*--split-block"):
        acf_config(tmp_path / "a", **{"items.cache": None}).validate()
    cfg = acf_config(tmp_path / "b", **{"items.cache": str(pooled_only_cache())}).validate()
    with pytest.raises(PixelrecError, match=r"pooled embeddings only; --model acf .*pixelrec encode .*--split-block"):
        fit(cfg)
    other = session_root() / "vinet_other.csv"
    other.write_text("item_id,user_id,timestamp\n" + "".join(f"zz{i},u{u},{i}\n" for u in range(3) for i in range(4)))
    cfg = acf_config(tmp_path / "c", interactions=str(other)).validate()
    with pytest.raises(PixelrecError, match=r"4 of 4 items .* no cached tokens .*pixelrec encode --images"):
        fit(cfg)


def test_cli_acf_without_cache_is_one_line(tmp_path):
    ds = cold_dataset()
    r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "r", "--model", "acf"])
    one_error_line(r, "--model acf", "--cache", "pixelrec encode")


# ------------------------------------------------------------------------------ the command line
def test_cli_acf_fit_evaluate_retrieve_history(tmp_path):
    ds = cold_dataset()
    out = tmp_path / "acf"
    assert_fit_evaluate_retrieve_history(ds, out, "acf", ["--cache", str(ds.cache())])


def test_acf_serving_answers_a_user_and_a_history():
    from pixelrec.runs.serving.engine import RecommendQuery, answer
    from pixelrec.runs.serving.snapshot import load_snapshot

    run_dir = str(acf_run().run_dir)
    snapshot = load_snapshot(run_dir)
    data = load_trained(run_dir).data
    history = tuple(str(data.item_ids[i]) for i in data.history(5, "all"))
    by_user, by_history = answer(snapshot, [RecommendQuery(user_id=str(data.user_ids[5]), k=5),
                                            RecommendQuery(history=history, k=5)])
    assert by_user.items == retrieve_one(run_dir, user=str(data.user_ids[5]), k=5).items  # the learned e_u
    assert by_history.items == retrieve_one(run_dir, history=list(history), k=5).items  # folded in
    assert by_user.items != by_history.items or by_user.scores != by_history.scores


# ------------------------------------------------------------------------------ VisRank
def test_visrank_scores_by_hand():
    vectors = np.array([[0, 0], [1, 0], [0, 2], [3, 3], [-1, 0], [0, 0]], dtype=np.float32)  # item 5: no image
    h = np.sqrt(0.5)
    # cosine similarities of items 1..5 to the history items 1 and 2
    to_1, to_2 = [1, 0, h, -1, 0], [0, 1, h, 0, 0]
    top1 = VisRank(vectors, k=1).scores(np.array([1, 2]))
    assert top1[0] == -np.inf and np.allclose(top1[1:], np.maximum(to_1, to_2))
    top2 = VisRank(vectors, k=2).scores(np.array([1, 2]))
    assert np.allclose(top2[1:], (np.array(to_1) + np.array(to_2)) / 2)
    assert np.allclose(VisRank(vectors, k=5).scores(np.array([1, 2]))[1:], top2[1:])  # k > history: all of it
    # only the last max_len items count; an empty history scores every item 0
    assert np.allclose(VisRank(vectors, k=1, max_len=1).scores(np.array([1, 2]))[1:], to_2)
    assert np.all(VisRank(vectors).scores(np.array([], dtype=np.int64))[1:] == 0)
    scores, ids = VisRank(vectors, k=1).top([np.array([1, 2])], 3)
    assert ids[0].tolist() == [3, 4, 5] and np.allclose(scores[0], [h, 0, 0])  # history excluded; 4 and 5 tie


@pytest.mark.parametrize("k", [1, 3])
def test_visrank_ranking_is_brute_force(k):
    rng = np.random.default_rng(k)
    vectors = rng.normal(size=(301, 8)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    histories = [rng.choice(np.arange(1, 301), size=n, replace=False) for n in (1, 4, 30, 60)]
    scores, ids = VisRank(vectors, k=k, max_len=50).top(histories, 20)
    for hist, got_ids, got_scores in zip(histories, ids, scores):
        sims = unit[1:] @ unit[hist[-50:]].T  # [300, H], computed here from scratch
        expected = np.sort(sims, axis=1)[:, ::-1][:, : min(k, sims.shape[1])].mean(1)
        expected[hist - 1] = -np.inf
        best = np.argsort(-expected, kind="stable")[:20] + 1
        assert got_ids.tolist() == best.tolist()
        assert np.allclose(got_scores, expected[best - 1], atol=1e-6)


def test_cli_visrank_fit_evaluate_retrieve_history(tmp_path):
    ds = cold_dataset()
    out = tmp_path / "visrank"
    r = invoke(["fit", "--interactions", ds.interactions, "--out", out, "--model", "visrank", "--items", "frozen",
                "--cache", str(ds.cache()), "--visrank-k", "2", "--max-len", "10"])
    assert r.exit_code == 0, r.output
    assert f"{out}: no training, test NDCG@10" in r.stdout
    r = invoke(["evaluate", out, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["index"]["exact"] and report["run"]["model"] == "visrank"
    assert report["overall"] == json.loads((out / "results.json").read_text())["overall"]  # what fit measured
    # the test metrics from scratch: each user's target ranked by the top-2 mean cosine similarity
    data = load_sequences(str(ds.interactions))
    from pixelrec.encode.cache import open_cache

    cache = open_cache(ds.cache())
    unit = np.zeros((data.num_items + 1, cache.dim), dtype=np.float32)
    unit[1:] = cache.read_embeddings(cache.rows_for(data.item_ids[1:]))
    unit[1:] /= np.linalg.norm(unit[1:], axis=1, keepdims=True)
    hits = 0
    for u in range(data.num_users):
        hist = data.history(u, "test")
        sims = unit[1:] @ unit[hist[-10:]].T
        scores = np.sort(sims, axis=1)[:, ::-1][:, :2].mean(1)
        scores[hist - 1] = -np.inf
        target = data.targets("test")[u]
        hits += int((scores > scores[target - 1]).sum() + (scores[: target - 1] == scores[target - 1]).sum() < 10)
    assert report["overall"]["recall@10"] == pytest.approx(hits / data.num_users)
    history = [str(data.item_ids[i]) for i in data.history(0, "test")[-5:]]
    r = invoke(["retrieve", out, "--history", ",".join(history), "--json", "--k", "5"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(history)
    index = {str(t): i for i, t in enumerate(data.item_ids)}
    scores = np.sort(unit @ unit[[index[h] for h in history]].T, axis=1)[:, ::-1][:, :2].mean(1)
    assert got["scores"] == pytest.approx([scores[index[i]] for i in got["items"]], abs=1e-5)
    r = invoke(["retrieve", out, "--user", str(data.user_ids[0]), "--json", "--k", "3"])
    assert r.exit_code == 0, r.output
    # commands that read a published model's vectors refuse the run in one line
    one_error_line(invoke(["serve", out, "--check"]), "--model visrank", "no item or user vectors")


def test_visrank_refusals(tmp_path):
    ds = cold_dataset()
    r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "a", "--model", "visrank"])
    one_error_line(r, "--model visrank", "--cache", "pixelrec encode")
    for tower in ("id", "partial"):  # no item tower of its own: another one would be ignored, so it is refused
        r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / tower, "--model", "visrank",
                    "--items", tower, "--cache", str(ds.cache())])
        one_error_line(r, "--model visrank", "use --items frozen")
    r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "b", "--visrank-k", "2"])
    one_error_line(r, "--visrank-k", "visrank")
    other = session_root() / "vinet_other.csv"
    other.write_text("item_id,user_id,timestamp\n" + "".join(f"zz{i},u{u},{i}\n" for u in range(3) for i in range(4)))
    r = invoke(["fit", "--interactions", other, "--out", tmp_path / "c", "--model", "visrank", "--items", "frozen",
                "--cache", str(ds.cache())])
    one_error_line(r, "4 of 4 items", "no cached embedding", "pixelrec encode --images")
    assert not (tmp_path / "c").exists()
