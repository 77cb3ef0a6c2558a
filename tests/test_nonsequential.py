"""The non-sequential models: FM, DSSM (users from the history's item vectors), MF and VBPR (a learned
vector per training user), and fold-in of users without one (recommend/foldin.py)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from fixtures_images import cold_dataset
from fixtures_runs import assert_fit_evaluate_retrieve_history, invoke, one_error_line, popularity_ndcg, session_root, tiny_config
from pixelrec.data.sequences import load_sequences
from pixelrec.encode.cache import open_cache
from pixelrec.errors import PixelrecError
from pixelrec.recommend.build import build_recommender
from pixelrec.recommend.config import FitConfig, ItemsConfig, SequenceConfig, TrainConfig
from pixelrec.recommend.foldin import fold_in
from pixelrec.recommend.models.dssm import DSSM
from pixelrec.recommend.models.fm import FM
from pixelrec.recommend.models.vbpr import id_width
from pixelrec.runs.fit import fit
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.trained import load_trained

GROUPS, PER_GROUP, USERS = 4, 10, 120


def write_taste_data(path) -> None:
    """USERS users, each with a favourite group of PER_GROUP items (user % GROUPS): 10 interactions from
    it and 2 from elsewhere, in random order; every item about equally popular."""
    rng = np.random.default_rng(0)
    rows = ["item_id,user_id,timestamp"]
    for u in range(USERS):
        group = u % GROUPS
        own = rng.choice(PER_GROUP, 10, replace=False) + group * PER_GROUP
        other = rng.choice([i for i in range(GROUPS * PER_GROUP) if i // PER_GROUP != group], 2, replace=False)
        items = rng.permutation(np.concatenate([own, other]))
        rows += [f"t{i:03d},u{u:03d},{t}" for t, i in enumerate(items)]
    path.write_text("\n".join(rows) + "\n")


@functools.lru_cache(maxsize=None)
def taste_run(model: str = "mf"):
    root = session_root() / "nonseq"
    root.mkdir(exist_ok=True)
    csv = root / "taste.csv"
    if not csv.exists():
        write_taste_data(csv)
    cfg = tiny_config(csv, root / f"run_{model}", model=model, epochs=15, lr=1e-2, patience=15, dropout=0.0)
    return fit(cfg)




# ------------------------------------------------------------------------------ FM and DSSM by hand
def test_fm_and_dssm_states_by_hand():
    x = torch.tensor([[[0., 0.], [1., 2.], [3., -1.], [0.5, 0.5]]])  # [1, 4, 2], position 0 is padding
    mask = torch.tensor([[False, True, True, True]])
    x_padded = x.clone()
    x_padded[0, 0] = 7.0  # whatever a padding slot holds, it is not summed
    cfg = SequenceConfig(model="fm", dim=2, dropout=0.0)
    fm = FM(cfg).eval()(x_padded, mask)[0]
    assert fm[1:].tolist() == [[1., 2.], [4., 1.], [4.5, 1.5]]
    dssm = DSSM(SequenceConfig(model="dssm", dim=2, dropout=0.0)).eval()(x_padded, mask)[0]
    assert torch.allclose(dssm[1:], torch.tensor([[1., 2.], [2., 0.5], [1.5, 0.5]]))
    with_mlp = DSSM(SequenceConfig(model="dssm", dim=2, dropout=0.0, dssm_mlp="5,3")).eval()
    assert [m.out_features for m in with_mlp.mlp if isinstance(m, torch.nn.Linear)] == [5, 3, 2]
    mean = torch.tensor([[[1., 2.], [2., 0.5], [1.5, 0.5]]])
    assert torch.allclose(with_mlp(x_padded, mask)[:, 1:], with_mlp.mlp(mean))


def test_fm_ranks_as_the_factorisation_machines_pair_term():
    """The reference's FM score over the fields {history, candidate}: 0.5 * sum_f[(sum v)^2 - sum v^2]; it
    differs from <user state, candidate> by the same constant for every candidate."""
    torch.manual_seed(0)
    history, candidates = torch.randn(5, 8), torch.randn(30, 8)
    state = FM(SequenceConfig(model="fm", dim=8, dropout=0.0))(history[None], torch.ones(1, 5, dtype=torch.bool))[0, -1]
    fields = torch.cat([history[None].expand(30, -1, -1), candidates[:, None]], 1)  # [30, 6, 8]
    pair_term = 0.5 * (fields.sum(1) ** 2 - (fields ** 2).sum(1)).sum(-1)
    gap = pair_term - candidates @ state
    assert torch.allclose(gap, gap[0].expand(30), atol=1e-4)


# ------------------------------------------------------------ FM and DSSM with --context window
def test_context_window_states_are_the_windows_other_items_by_hand():
    x = torch.tensor([[[7., 7.], [1., 2.], [3., -1.], [0.5, 0.5]]])  # position 0 is padding
    mask = torch.tensor([[False, True, True, True]])
    targets = mask.clone()
    fm = FM(SequenceConfig(model="fm", dim=2, dropout=0.0, context="window")).eval()
    assert fm.objective == "context"
    assert fm(x, mask, targets)[0, 1:].tolist() == [[3.5, -0.5], [1.5, 2.5], [4., 1.]]
    assert fm(x, mask)[0, 1:].tolist() == [[1., 2.], [4., 1.], [4.5, 1.5]]  # served: causal, as by default
    dssm = DSSM(SequenceConfig(model="dssm", dim=2, dropout=0.0, context="window")).eval()
    assert torch.allclose(dssm(x, mask, targets)[0, 1:], torch.tensor([[1.75, -0.25], [0.75, 1.25], [2., 0.5]]))
    assert FM(SequenceConfig(model="fm", dim=2, dropout=0.0)).objective == "causal"


def test_context_window_loss_is_each_items_softmax_given_the_others_by_hand(tmp_path):
    """The whole training loss of two chunks, written out: every real item of a window (with another
    real item in it) is a softmax target over the catalogue, scored from the sum of the window's others."""
    from pixelrec.recommend.batches import context_slots

    csv = tmp_path / "t.csv"
    write_taste_data(csv)
    cfg = tiny_config(csv, tmp_path / "o", model="fm", dropout=0.0, context="window")
    cfg.train.windows, cfg.loss.softmax = "chunks", "full"
    cfg.validate()
    data = load_sequences(str(csv))
    model = build_recommender(cfg, data, torch.device("cpu"))
    seq = torch.tensor([[0, 0, 3, 5, 9], [0, 0, 0, 0, 4]])  # the second window has no item to predict from
    trained = torch.tensor([4, 4])
    hidden = model.draw_hidden(seq, trained, torch.Generator().manual_seed(0))
    assert hidden.tolist() == context_slots(seq, trained).tolist() == [[False, False, True, True, True], [False] * 5]
    got = model.recommendation_loss(seq, hidden=hidden)
    table = model.tower(torch.arange(model.tower.num_items + 1))
    known = model.known_items
    terms = []
    for j, item in enumerate([3, 5, 9]):
        others = table[[3, 5, 9]].sum(0) - table[item]
        logits = table[known] @ others
        terms.append(torch.logsumexp(logits, 0) - logits[(known == item).nonzero()[0, 0]])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-6), (got, terms)


@pytest.mark.parametrize("model", ["fm", "dssm"])
def test_context_window_fit_learns_each_users_taste(tmp_path, model):
    csv = tmp_path / "t.csv"
    write_taste_data(csv)
    r = invoke(["fit", "--interactions", csv, "--out", tmp_path / "r", "--model", model, "--context", "window",
                "--max-len", "10", "--dim", "16", "--epochs", "15", "--lr", "1e-2", "--dropout", "0",
                "--batch-size", "32", "--device", "cpu", "--min-interactions", "3"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert config["model"]["context"] == "window" and config["train"]["windows"] == "chunks"  # its windows
    metrics = json.loads((tmp_path / "r" / "results.json").read_text())  # test split
    baseline = popularity_ndcg(load_sequences(str(csv)))
    assert metrics["overall"]["ndcg@10"] > baseline + 0.15, (metrics, baseline)


def test_context_window_refusals(tmp_path):
    ds = cold_dataset()
    base = ["fit", "--interactions", ds.interactions, "--out", tmp_path / "r"]
    one_error_line(invoke([*base, "--model", "fm", "--context", "window", "--windows", "sliding"]),
                   "--windows sliding", "--context window", "chunks or overlapping")
    one_error_line(invoke([*base, "--model", "sasrec", "--context", "window"]), "--context", "sasrec")
    one_error_line(invoke([*base, "--model", "dssm", "--context", "both"]), "--context", "both")


# ------------------------------------------------------------------------------ MF and fold-in
def test_mf_learns_each_users_taste_beyond_popularity():
    result = taste_run("mf")
    losses = [row["train_loss"] for row in json.loads("[" + ",".join(
        (result.run_dir / "metrics.jsonl").read_text().split("\n")[:-1]) + "]")]
    assert losses[-1] < 0.9 * losses[0]
    data = load_sequences(str(session_root() / "nonseq" / "taste.csv"))
    baseline = popularity_ndcg(data)
    assert result.test["overall"]["ndcg@10"] > baseline + 0.15, (result.test["overall"]["ndcg@10"], baseline)


def test_mf_run_keeps_a_vector_per_training_user():
    trained = load_trained(str(taste_run("mf").run_dir))
    weight = trained.model.encoder.user_embedding.weight
    assert weight.shape == (USERS, 16)
    users = (trained.run.path / "users.txt").read_text().split()
    assert len(users) == USERS  # line u names the user of row u
    got = trained.model.encode_histories([np.array([1, 2])], item_table=trained.table, users=np.array([7]))
    assert np.allclose(got[0], weight[7].detach().numpy())


def test_fold_in_of_a_training_user_ranks_close_to_the_learned_vector():
    trained = load_trained(str(taste_run("mf").run_dir))
    data, table = trained.data, trained.table
    histories = [data.history(u, "valid") for u in range(data.num_users)]  # the items MF trained on
    learned = trained.model.encode_histories(histories, item_table=table, users=np.arange(data.num_users))
    folded = trained.model.encode_histories(histories, item_table=table)  # no users: every history folded in
    scores_l, scores_f = learned @ table.numpy().T, folded @ table.numpy().T
    overlap, correlation = [], []
    for u, hist in enumerate(histories):
        scores_l[u, [0, *hist]] = scores_f[u, [0, *hist]] = -np.inf
        top_l, top_f = np.argsort(-scores_l[u])[:10], np.argsort(-scores_f[u])[:10]
        overlap.append(len(set(top_l) & set(top_f)) / 10)
        ranked = np.isfinite(scores_l[u])
        correlation.append(np.corrcoef(scores_l[u][ranked], scores_f[u][ranked])[0, 1])
    # measured 0.74 and 0.88; random vectors: 0.38 and 0.03, another user's learned vector 0.43 and 0.15
    assert np.mean(overlap) >= 0.65, np.mean(overlap)
    assert np.mean(correlation) >= 0.8, np.mean(correlation)
    # deterministic and independent of the other histories folded in with it
    alone = fold_in(table, [histories[3]])
    assert torch.equal(fold_in(table, [histories[3]]), alone)
    assert torch.allclose(fold_in(table, histories[:8])[3], alone[0], atol=1e-5)


def test_fold_in_keeps_the_fixed_tail_and_empty_histories():
    table = torch.randn(6, 4)
    table[0] = 0
    out = fold_in(table, [np.array([1, 2]), np.array([], dtype=np.int64)], fixed_tail=(1.0,))
    assert out[:, -1].tolist() == [1.0, 1.0]
    assert out[1, :3].abs().sum() == 0
    assert (out[0, :3] @ table[1:3, :3].T).min() > (out[0, :3] @ table[3:, :3].T).max() - 1.0  # leans to its items


# ------------------------------------------------------------------------------ VBPR
def vbpr_config(out, **kw) -> FitConfig:
    ds = cold_dataset()
    cfg = FitConfig(interactions=str(ds.interactions), out=str(out),
                    items=ItemsConfig(kind="frozen", cache=str(ds.cache())),
                    model=SequenceConfig(model="vbpr", dim=16, max_len=10, dropout=0.0),
                    train=TrainConfig(epochs=2, batch_size=64, lr=1e-2, device="cpu", patience=10))
    for key, value in kw.items():
        cfg.set(key, value)
    return cfg


def test_vbpr_dot_product_is_the_explicit_formula(tmp_path):
    cfg = vbpr_config(tmp_path / "r").validate()
    data = load_sequences(cfg.interactions)
    model = build_recommender(cfg, data).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # not the initial values: every term must count
        items = torch.arange(1, 9)
        users = torch.arange(5)
        got = model.user_vectors(torch.zeros(5, 10, dtype=torch.long), users=users) @ model.tower(items).T
        f = model.tower.image.embeddings[items].float()  # the cached embeddings
        linear = model.tower.image.adapter
        w = next(m for m in linear.modules() if isinstance(m, torch.nn.Linear))
        k = id_width(16)
        user = model.encoder.user_embedding.weight[users]
        gamma_u, theta_u = user[:, :k], user[:, k:]
        gamma_i = model.tower.embedding.weight[items]
        E, beta = w.weight[:-1], w.weight[-1]
        bias_e, bias_b = w.bias[:-1], w.bias[-1]
        explicit = gamma_u @ gamma_i.T + theta_u @ (f @ E.T).T + (f @ beta)[None]
        # the adapter's bias adds theta_u . b (a constant per user) and a global constant: ranks unchanged
        explicit = explicit + (theta_u @ bias_e)[:, None] + bias_b
    assert torch.allclose(got, explicit, atol=1e-3, rtol=1e-4)
    assert open_cache(cfg.items.cache).dim == f.shape[1]


def test_vbpr_refusals(tmp_path):
    with pytest.raises(PixelrecError, match=r"--model vbpr reads .* --items frozen --cache .*pixelrec encode"):
        vbpr_config(tmp_path / "a", **{"items.kind": "id", "items.cache": None}).validate()
    with pytest.raises(PixelrecError, match="drop --adapter mlp"):
        vbpr_config(tmp_path / "b", **{"items.adapter": "mlp"}).validate()
    # a cache that misses items of the interactions: one line naming the count and the encode command
    other = session_root() / "nonseq_other.csv"
    other.write_text("item_id,user_id,timestamp\n" + "".join(f"zz{i},u{u},{i}\n" for u in range(3) for i in range(4)))
    cfg = vbpr_config(tmp_path / "c", interactions=str(other))
    with pytest.raises(PixelrecError, match=r"4 of 4 items .* no cached embedding .*pixelrec encode --images"):
        fit(cfg)


# ------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("model", ["mf", "fm", "dssm", "vbpr"])
def test_cli_fit_evaluate_retrieve_history(tmp_path, model):
    ds = cold_dataset()
    out = tmp_path / model
    extra = ["--items", "frozen", "--cache", str(ds.cache())] if model == "vbpr" else []
    assert_fit_evaluate_retrieve_history(ds, out, model, extra)


def test_cli_dssm_mlp_refusal(tmp_path):
    ds = cold_dataset()
    r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "r", "--model", "dssm",
                "--dssm-mlp", "64,x"])
    one_error_line(r, "--dssm-mlp", "64,x")
    r = invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "r", "--model", "fm",
                "--dssm-mlp", "64"])
    one_error_line(r, "--dssm-mlp", "dssm")


def test_init_from_is_refused_for_models_with_user_vectors(tmp_path):
    from pixelrec.runs.transfer import init_from_run

    cfg = tiny_config(tmp_path / "i.csv", tmp_path / "o", model="mf")
    cfg.init_from = str(tmp_path / "source")
    with pytest.raises(PixelrecError, match="--model mf learns a vector per training user"):
        init_from_run(None, cfg)


def test_serving_uses_the_learned_vector_of_a_user_and_folds_in_a_history():
    from pixelrec.runs.serving.engine import RecommendQuery, answer
    from pixelrec.runs.serving.snapshot import load_snapshot

    run_dir = str(taste_run("mf").run_dir)
    snapshot = load_snapshot(run_dir)
    trained = load_trained(run_dir)
    data = trained.data
    history = tuple(str(data.item_ids[i]) for i in data.history(5, "all"))
    by_user, by_history = answer(snapshot, [RecommendQuery(user_id=str(data.user_ids[5]), k=5),
                                            RecommendQuery(history=history, k=5)])
    assert by_user.items == retrieve_one(run_dir, user=str(data.user_ids[5]), k=5).items  # the learned vector
    assert by_history.items == retrieve_one(run_dir, history=list(history), k=5).items  # folded in
    learned = trained.model.encode_histories([data.history(5, "all")], item_table=trained.table, users=np.array([5]))
    folded = trained.model.encode_histories([data.history(5, "all")], item_table=trained.table)
    assert not np.allclose(learned, folded)  # two different vectors, each served where it belongs
