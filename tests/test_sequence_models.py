"""NextItNet, LightSANs and SR-GNN (models/nextitnet.py, models/lightsans.py, models/srgnn.py) and the model registry
(models/registry.py): causality, padding invariance, the prefix objective, the options a model does
not have, and fit -> evaluate -> retrieve from the command line with the id and frozen towers."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_runs import default_settings_cache, invoke, one_error_line, synth_dataset
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import window_bounds
from pixelrec.recommend.config import MODEL_SPECS, FitConfig, SequenceConfig, apply_preset
from pixelrec.recommend.models.lightsans import LightSANs
from pixelrec.recommend.models.nextitnet import NextItNet
from pixelrec.recommend.models.srgnn import SRGNN, session_adjacency, session_nodes
from pixelrec.recommend.sequence import build_sequence_encoder

NEW_MODELS = ["nextitnet", "lightsans"]


def encoder(model: str, dim: int = 16, max_len: int = 12, layers: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = SequenceConfig(model=model, dim=dim, max_len=max_len, layers=layers, heads=2, inner_mult=2, dropout=0.0,
                         attn_dropout=0.0, **kw)
    return build_sequence_encoder(cfg).eval()


def padded(history: torch.Tensor, length: int, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """history [n, d] -> x [1, length, d] left-padded with `pad_value`, mask [1, length]."""
    n, d = history.shape
    x = torch.full((1, length, d), pad_value)
    x[0, length - n:] = history
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, length - n:] = True
    return x, mask


def test_registry_builds_each_models_class():
    assert isinstance(encoder("nextitnet"), NextItNet) and isinstance(encoder("lightsans"), LightSANs)
    assert isinstance(encoder("srgnn"), SRGNN)
    assert {name: spec.objective for name, spec in MODEL_SPECS.items()} == {
        "sasrec": "causal", "gru4rec": "causal", "nextitnet": "causal", "lightsans": "prefix", "srgnn": "prefix",
        "bert4rec": "cloze", "mf": "causal", "fm": "causal", "dssm": "causal", "vbpr": "causal",
        "acf": "causal", "visrank": "causal"}  # visrank trains nothing (its objective is unused)


# ------------------------------------------------------------------------------------- NextItNet
def test_nextitnet_is_causal():
    enc = encoder("nextitnet")
    torch.manual_seed(1)
    x, mask = torch.randn(2, 12, 16), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        before = enc(x, mask)
        for t in (0, 5, 11):
            y = x.clone()
            y[:, t] += 3.0  # a later item changes
            after = enc(y, mask)
            assert torch.equal(after[:, :t], before[:, :t]), t  # earlier states: exactly unchanged
            assert not torch.allclose(after[:, t], before[:, t]), t


def test_nextitnet_blocks_follow_the_dilations():
    """--dilations 1,4 x --layers 3: 6 residual blocks convolving at 1,2,4,8 (x3), so the last state
    sees exactly the 3 * 2 * (1+2+4+8) = 90 items before it and no more."""
    enc = encoder("nextitnet", max_len=100, layers=3, dilations="1,4")
    convs = [(b.conv1.conv.dilation[0], b.conv2.conv.dilation[0]) for b in enc.blocks]
    assert convs == [(1, 2), (4, 8)] * 3
    torch.manual_seed(2)
    x, mask = torch.randn(1, 100, 16), torch.ones(1, 100, dtype=torch.bool)
    with torch.no_grad():
        last = enc(x, mask)[0, -1]
        for t, seen in ((99 - 90, True), (99 - 91, False)):
            y = x.clone()
            y[0, t] += 5.0
            assert torch.allclose(enc(y, mask)[0, -1], last) != seen, t


# ------------------------------------------------------------------------------ both new models
@pytest.mark.parametrize("model", NEW_MODELS)
def test_user_vector_does_not_depend_on_padding(model):
    """The same 5-item history with 1 or 7 padded slots, and padded slots holding garbage (an image
    tower's padding vector is no zero vector): the same user vector."""
    enc = encoder(model)
    torch.manual_seed(3)
    history = torch.randn(5, 16)
    with torch.no_grad():
        short = enc(*padded(history, 6))
        long = enc(*padded(history, 12))
        garbage = enc(*padded(history, 12, pad_value=7.0))
    assert torch.allclose(short[0, -1], long[0, -1], atol=1e-5)
    assert torch.allclose(garbage[0, -1], long[0, -1], atol=1e-5)
    if model == "nextitnet":  # causal: every real position's state is the same
        assert torch.allclose(short[0, 1:], long[0, 7:], atol=1e-5)
    assert torch.isfinite(enc(*padded(history[:0], 12))).all()  # an empty history: no NaN


def test_lightsans_sees_the_whole_window_so_it_trains_on_prefixes():
    enc = encoder("lightsans")
    torch.manual_seed(4)
    x, mask = torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        y = x.clone()
        y[0, -1] = torch.randn(16)  # (a constant shift would vanish in the input LayerNorm)
        assert not torch.allclose(enc(y, mask)[0, 0], enc(x, mask)[0, 0])  # not causal
    # hence its windows: one per prefix, training only the prefix's next item (the last position)
    assert window_bounds(6, 3, "prefixes", 1) == [(0, 2, 1), (0, 3, 1), (0, 4, 1), (1, 5, 1), (2, 6, 1)]
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "lightsans"
    assert (cfg.validate().train.windows, cfg.train.stride) == ("prefixes", 1)
    cfg.train.windows = "chunks"
    with pytest.raises(PixelrecError, match="--windows chunks .* --model lightsans .* use --windows prefixes"):
        cfg.check()


@pytest.mark.parametrize("model, flag, value, owner", [
    ("gru4rec", "--heads", "4", "sasrec, lightsans or bert4rec"),
    ("sasrec", "--dilations", "1,2", "nextitnet"),
    ("nextitnet", "--interests", "2", "lightsans"),
    ("lightsans", "--positions", "absolute", "sasrec"),
    ("lightsans", "--norm", "post", "sasrec or bert4rec"),
    ("srgnn", "--heads", "4", "sasrec, lightsans or bert4rec"),
    ("srgnn", "--dilations", "1,2", "nextitnet"),
    # the non-sequential models stack no layers
    ("mf", "--layers", "2", "sasrec, gru4rec, nextitnet, lightsans, srgnn or bert4rec"),
    ("fm", "--layers", "2", "sasrec, gru4rec"),
    ("visrank", "--layers", "2", "sasrec, gru4rec"),
])
def test_an_option_the_model_does_not_have_is_refused(tmp_path, model, flag, value, owner):
    r = invoke(["fit", "--interactions", synth_dataset().interactions, "--out", tmp_path / "run", "--model", model,
                flag, value, "--print-config"])
    assert r.exit_code == 2
    one_error_line(r, f"{flag} is not a setting of --model {model}", f"read by --model {owner}")


def test_the_preset_sets_only_the_models_own_settings():
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "nextitnet"
    record = apply_preset(cfg, "pixelrec").validate().record()
    assert record["model"]["dim"] == 1024 and record["model"]["dilations"] == "1,4"
    assert record["model"]["heads"] is None and record["model"]["interests"] is None  # not nextitnet's
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "lightsans"
    record = apply_preset(cfg, "pixelrec").validate().record()
    assert (record["model"]["interests"], record["train"]["windows"], record["model"]["dilations"]) == (3, "prefixes", None)
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "lightsans"
    assert cfg.validate().record()["model"]["interests"] == 5  # RecBole's, not the reference's 3 (docs/results.md)
    assert FitConfig.from_dict(record).model.dilations == "1,4"  # null -> the default again


# ------------------------------------------------------------------------------ from the command line
@pytest.mark.parametrize("model", [*NEW_MODELS, "srgnn"])
@pytest.mark.parametrize("items", ["id", "frozen"])
def test_fit_evaluate_retrieve_from_the_command_line(tmp_path, model, items):
    data = synth_dataset()
    run = tmp_path / "run"
    tower = ["--items", "frozen", "--cache", default_settings_cache()] if items == "frozen" else []
    r = invoke(["fit", "--interactions", data.interactions, "--out", run, "--model", model, *tower, "--dim", "16",
                "--max-len", "8", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["model"]["model"] == model and config["items"]["kind"] == items
    assert config["train"]["windows"] == MODEL_SPECS[model].defaults["train.windows"]

    r = invoke(["evaluate", run, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    # the published index scores the test users as fit did
    assert report["overall"]["ndcg@10"] == pytest.approx(fitted["test"]["ndcg@10"], abs=1e-6)

    item_ids = [line.split(",")[0] for line in data.interactions.read_text().splitlines()[1:4]]
    r = invoke(["retrieve", run, "--history", ",".join(item_ids), "--k", "5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(item_ids)


# ------------------------------------------------------------------------------------- SR-GNN
def test_srgnn_session_graph_of_a_history_with_a_repeated_item():
    """a b a c (ids 7 5 7 9), left-padded: nodes a, b, c (in id order: b=0, a=1, c=2; padding its own
    node); edges a->b, b->a, a->c. In-adjacency rows divide by the node's in-degree, out-adjacency
    rows by its out-degree (a has two successors)."""
    items = torch.tensor([[0, 0, 7, 5, 7, 9]])
    mask = items != 0
    alias = session_nodes(items, mask)
    assert alias.tolist() == [[0, 0, 2, 1, 2, 3]]  # padding = node 0, b = 1, a = 2, c = 3
    a_in, a_out = session_adjacency(alias, mask)
    want_in, want_out = torch.zeros(6, 6), torch.zeros(6, 6)
    b, a, c = 1, 2, 3
    want_in[b, a], want_in[a, b], want_in[c, a] = 1.0, 1.0, 1.0  # each node has one predecessor
    want_out[a, b], want_out[a, c], want_out[b, a] = 0.5, 0.5, 1.0
    assert torch.equal(a_in[0], want_in) and torch.equal(a_out[0], want_out)
    # a repeated edge counts once (a b a b: a->b twice, b->a once), as in the reference
    items = torch.tensor([[7, 5, 7, 5]])
    a_in, a_out = session_adjacency(session_nodes(items, items != 0), items != 0)
    swap = [[0.0, 1.0], [1.0, 0.0]]  # nodes b = 0, a = 1
    assert a_in[0, :2, :2].tolist() == swap and a_out[0, :2, :2].tolist() == swap


def reference_srgnn_user(enc: SRGNN, history: list[int], table: torch.Tensor) -> torch.Tensor:
    """The reference's per-sample construction (np.unique nodes, u_A[u][v] = 1 per consecutive pair,
    column / row sums as degrees) and readout, written out with the model's weights."""
    nodes = sorted(set(history))
    n = len(nodes)
    adj = torch.zeros(n, n)
    for u, v in zip(history, history[1:]):
        adj[nodes.index(u), nodes.index(v)] = 1.0
    a_in = adj.t() / adj.sum(0).clamp(min=1)[:, None]
    a_out = adj / adj.sum(1).clamp(min=1)[:, None]
    h = table[nodes]
    for step in enc.steps:
        msg = torch.cat([a_in @ step.edge_in(h) + step.bias_in, a_out @ step.edge_out(h) + step.bias_out], 1)
        h = step.cell(msg, h)
    seq = h[[nodes.index(i) for i in history]]
    alpha = enc.q(torch.sigmoid(enc.w1(seq[-1]) + enc.w2(seq)))
    return enc.w3(torch.cat([(alpha * seq).sum(0), seq[-1]]))


def test_srgnn_user_vector_is_the_references_and_does_not_depend_on_padding():
    enc = encoder("srgnn")
    torch.manual_seed(5)
    table = torch.randn(10, 16)
    history = torch.tensor([3, 1, 3, 4, 2])

    def user(length: int, pad_vector: float = 0.0, hist: torch.Tensor = history) -> torch.Tensor:
        items = torch.zeros(1, length, dtype=torch.long)
        items[0, length - len(hist):] = hist
        x = table[items]
        x[items == 0] = pad_vector  # an image tower's padding vector is no zero vector
        with torch.no_grad():
            return enc(x, items != 0, items)[0, -1]

    long = user(12)
    assert torch.allclose(user(5), long, atol=1e-5) and torch.allclose(user(12, 7.0), long, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(long, reference_srgnn_user(enc, history.tolist(), table), atol=1e-5)
    # the repeated item 3 is one node: its vector's gradient is the reference's (not counted per copy)
    grads = []
    for user_of in (lambda t: enc(t[None, history], torch.ones(1, 5, dtype=torch.bool), history[None])[0, -1],
                    lambda t: reference_srgnn_user(enc, history.tolist(), t)):
        t = table.clone().requires_grad_()
        user_of(t).sum().backward()
        grads.append(t.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0][3].abs().sum() > 0
    assert torch.isfinite(user(12, hist=history[:0])).all()  # an empty history: no NaN
    # batched: the rows of one batch are the rows encoded alone
    items = torch.tensor([[0, 0, 3, 1, 3, 4, 2], [5, 5, 6, 5, 7, 8, 9]])
    with torch.no_grad():
        both = enc(table[items], items != 0, items)[:, -1]
        second = enc(table[items[1:]], items[1:] != 0, items[1:])[0, -1]
    assert torch.allclose(both[0], long, atol=1e-5) and torch.allclose(both[1], second, atol=1e-5)


def test_prefix_windows_train_only_the_last_position():
    from pixelrec.recommend.model import trained_positions

    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])  # windows of max_len 4 (+ the target)
    mask = trained_positions(seq, torch.tensor([1, 1]))
    assert mask.tolist() == [[False, False, False, True]] * 2
