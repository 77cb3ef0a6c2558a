"""BERT4Rec and the cloze objective (models/bert4rec.py, batches.cloze_masks, model.Targets): which slots
a step hides, the mask slot appended at inference, the softmax and bpr losses by hand, learning a
sequential pattern beyond popularity, the frozen tower from the command line, resume and torchrun,
and the options that belong to it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_runs import (assert_two_rank_fit_equals_one, default_settings_cache, handmade_dataset, invoke,
                           one_error_line, popularity_ndcg, read_jsonl, session_root, synth_dataset, tiny_config)
from pixelrec.data.sequences import load_sequences
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import cloze_masks, sample_negatives
from pixelrec.recommend.config import FitConfig, LossConfig, SequenceConfig, apply_preset
from pixelrec.recommend.model import Recommender
from pixelrec.recommend.models.bert4rec import BERT4Rec
from pixelrec.recommend.sequence import build_sequence_encoder
from pixelrec.recommend.towers import IdTower
from pixelrec.runs.fit import fit
from test_fit import _assert_same_weights, _best, _untimed


def encoder(dim: int = 16, max_len: int = 6, seed: int = 0, **kw) -> BERT4Rec:
    torch.manual_seed(seed)
    cfg = SequenceConfig(model="bert4rec", dim=dim, max_len=max_len, layers=2, heads=2, inner_mult=2, dropout=0.0,
                         attn_dropout=0.0, **kw)
    return build_sequence_encoder(cfg).eval()


def recommender(loss: str = "softmax", num_items: int = 30, max_len: int = 6, **kw) -> Recommender:
    enc = encoder(max_len=max_len, **kw)
    softmax = "full" if loss == "softmax" else "auto"
    return Recommender(IdTower(num_items, 16), enc, max_len, LossConfig(loss=loss, softmax=softmax)).eval()


def windows(batch: int = 400, width: int = 11, num_items: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded windows [batch, width] of 1..width real items, and `trained` = items - 1."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (batch, width), generator=g)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    seq[torch.arange(width)[None] < (width - lengths)[:, None]] = 0
    return seq, lengths - 1


# ------------------------------------------------------------------------------ which slots are hidden
def test_cloze_masks_hide_the_ratio_at_least_one_and_never_padding():
    seq, trained = windows()
    hidden = cloze_masks(seq, trained, 0.3, 0.0, torch.Generator().manual_seed(1))
    real = seq != 0
    assert not (hidden & ~real).any()  # padding is never hidden
    has_target = trained > 0
    assert hidden[has_target].any(1).all()  # at least one per window that trains
    assert not hidden[~has_target].any()  # a one-item window (nothing to train) hides nothing
    long = has_target & (real.sum(1) == 11)
    share = hidden[long].float().mean().item()  # full windows: the ratio (a forced one adds < 0.3 ** 11 / 11)
    assert 0.27 < share < 0.33, share
    one = cloze_masks(seq, trained, 0.0, 0.0, torch.Generator().manual_seed(1))  # ratio 0: exactly one each
    assert torch.equal(one.sum(1), has_target.long())


def test_cloze_masks_are_drawn_from_the_generator():
    seq, trained = windows()
    a = cloze_masks(seq, trained, 0.2, 0.5, torch.Generator().manual_seed(7))
    b = cloze_masks(seq, trained, 0.2, 0.5, torch.Generator().manual_seed(7))
    c = cloze_masks(seq, trained, 0.2, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_last_share_hides_only_the_last_item():
    seq, trained = windows()
    has_target = trained > 0
    every = cloze_masks(seq, trained, 0.5, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(every[:, -1], has_target) and not every[:, :-1].any()
    half = cloze_masks(seq, trained, 0.5, 0.5, torch.Generator().manual_seed(2))
    only_last = (half.sum(1) == 1) & half[:, -1]
    # with ratio 0.5, a window hides only its last item by chance with probability <= 0.25
    assert 0.5 < only_last[has_target].float().mean().item() < 0.75


# ------------------------------------------------------------------------------ inference = last-item cloze
@pytest.mark.parametrize("head", [True, False])
def test_the_mask_slot_appended_at_inference_is_the_training_state_of_a_hidden_last_item(head):
    """user_vectors(history) appends a mask slot after the history; training a window whose last item
    is hidden computes the same state for that slot (the hidden item's vector is never read)."""
    rec = recommender(bert_head=head)
    seq, _ = windows(batch=8, width=7, num_items=30)
    seq[:, -1] = torch.arange(1, 9)  # every window has a last item to hide
    hidden = torch.zeros_like(seq, dtype=torch.bool)
    hidden[:, -1] = True
    with torch.no_grad():
        vecs = rec.tower(torch.arange(31))[seq]
        trained_state = rec.states(vecs, seq, hidden=hidden)[:, -1]
        served = rec.user_vectors(seq[:, :-1])  # the window's first max_len items as the history
    assert torch.allclose(trained_state, served, atol=1e-6)
    assert isinstance(rec.encoder.head, torch.nn.Sequential) == head


def test_item_bias_is_the_item_vectors_last_coordinate_added_to_every_score():
    """--item-bias: every state (training and served) ends in the constant 1, so an item's score is the
    dot product of the other coordinates plus the item vector's last one; without it, nothing is fixed."""
    rec = recommender(item_bias=True)
    seq, _ = windows(batch=8, width=7, num_items=30)
    seq[:, -1] = torch.arange(1, 9)
    hidden = cloze_masks(seq, torch.full((8,), 6), 0.3, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        table = rec.tower(torch.arange(31))  # [31, 16]
        trained = rec.states(table[seq], seq, hidden=hidden)  # [8, 7, 16]
        users = rec.user_vectors(seq[:, :-1])  # [8, 16]
    assert torch.equal(trained[..., -1], torch.ones(8, 7)) and torch.equal(users[:, -1], torch.ones(8))
    assert users[:, :-1].abs().min() > 0  # the other coordinates are the head's output, not constants
    scores = users @ table.T
    assert torch.allclose(scores, users[:, :-1] @ table[:, :-1].T + table[:, -1], atol=1e-6)
    plain = recommender(item_bias=False)
    with torch.no_grad():
        assert not torch.equal(plain.user_vectors(seq[:, :-1])[:, -1], torch.ones(8))


def test_user_vector_does_not_depend_on_padding_and_sees_the_whole_history():
    enc = encoder(max_len=10)
    torch.manual_seed(3)
    history = torch.randn(4, 16)
    x = torch.full((2, 10, 16), 7.0)  # padding slots hold garbage: an image tower's padding is no zero vector
    x[0, 6:] = history
    x[1, 6:] = history
    x[1, :6] = -3.0
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad():
        out = enc(x, mask)
        assert out.shape == (2, 11, 16)  # the appended mask slot is the last state
        assert torch.allclose(out[0, -1], out[1, -1], atol=1e-5)
        y = x.clone()
        y[:, 6] = torch.randn(16)  # the oldest item changes: a bidirectional model's every state changes
        assert not torch.allclose(enc(y, mask)[0, -1], out[0, -1])
        empty = enc(x, torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(empty).all()


# ------------------------------------------------------------------------------ the losses by hand
def test_full_softmax_cloze_loss_by_hand():
    rec = recommender("softmax")
    seq, trained = windows(batch=6, width=7, num_items=30)
    hidden = cloze_masks(seq, trained, 0.4, 0.0, torch.Generator().manual_seed(0))
    loss = rec.training_loss(seq, trained=trained, hidden=hidden)
    table = rec.tower(torch.arange(31))
    x = torch.where(hidden[..., None], rec.encoder.mask_vector, table[seq])
    states = rec.encoder(x, seq != 0, hidden)
    logits = states[hidden] @ table[1:].T  # every item (all known here)
    want = F.cross_entropy(logits, seq[hidden] - 1)
    assert torch.allclose(loss, want, atol=1e-5)


def test_bpr_cloze_loss_by_hand_with_one_negative_per_hidden_slot():
    rec = recommender("bpr")
    seq, trained = windows(batch=6, width=7, num_items=30)
    g = torch.Generator().manual_seed(0)
    hidden = cloze_masks(seq, trained, 0.6, 0.0, g)
    neg = sample_negatives(seq, rec.known_items, g, width=seq.shape[1])
    assert neg.shape == seq.shape and not (neg[:, :, None] == seq[:, None, :]).any()
    loss = rec.training_loss(seq, neg, trained=trained, hidden=hidden)
    table = rec.tower(torch.arange(31))
    states = rec.encoder(table[seq], seq != 0, hidden)[hidden]
    want = -F.logsigmoid((states * table[seq[hidden]]).sum(-1) - (states * table[neg[hidden]]).sum(-1)).mean()
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("loss", ["bpr", "sampled"])
def test_a_batch_share_of_one_process_computes_the_plain_cloze_loss(loss):
    """The distributed path (`BatchShare`: the global batch's hidden targets as in-batch candidates,
    its positions as the normaliser) with one process gives the plain loss."""
    from pixelrec.distributed import World
    from pixelrec.recommend.model import BatchShare

    rec = recommender("bpr" if loss == "bpr" else "softmax")
    if loss == "sampled":
        rec.loss_cfg = LossConfig(softmax="sampled", negatives=12)
    seq, trained = windows(batch=6, width=7, num_items=30)
    g = torch.Generator().manual_seed(0)
    hidden = rec.draw_hidden(seq, trained, g)
    neg = sample_negatives(seq, rec.known_items, g, width=seq.shape[1]) if loss == "bpr" else None
    uniform = rec.draw_uniform_negatives(g)
    plain = rec.training_loss(seq, neg, None, trained, uniform=uniform, hidden=hidden)
    share = BatchShare(seq=seq, trained=trained, neg=neg, world=World(), hidden=hidden)
    shared = rec.training_loss(seq, neg, None, trained, uniform=uniform, share=share, hidden=hidden)
    assert share.positions == int(hidden.sum()) and torch.equal(share.targets, seq[hidden])
    assert torch.allclose(plain, shared, atol=1e-6)


# ------------------------------------------------------------------------------ it learns
def write_chain_data(path, items: int = 40, users: int = 160) -> None:
    """Each user walks a chain: consecutive items i, i+1, ... (mod `items`) from a random start; every
    item about equally popular, so only the order tells the next item."""
    rng = np.random.default_rng(0)
    rows = ["item_id,user_id,timestamp"]
    for u in range(users):
        start, n = int(rng.integers(items)), int(rng.integers(6, 11))
        rows += [f"c{(start + t) % items:02d},u{u:03d},{t}" for t in range(n)]
    path.write_text("\n".join(rows) + "\n")




@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_bert4rec_learns_the_order_beyond_popularity(loss):
    root = session_root() / "bert4rec"
    root.mkdir(exist_ok=True)
    csv = root / "chains.csv"
    if not csv.exists():
        write_chain_data(csv)
    cfg = tiny_config(csv, root / f"run_{loss}", model="bert4rec", loss=loss, epochs=12, batch_size=8, lr=3e-3,
                      patience=12, dropout=0.0, layers=2, heads=2)
    cfg.model.attn_dropout = 0.0
    result = fit(cfg)
    losses = [row["train_loss"] for row in read_jsonl(result.run_dir / "metrics.jsonl")]
    assert losses[-1] < 0.85 * losses[0], losses
    baseline = popularity_ndcg(load_sequences(str(csv)))  # about 0.18
    assert result.test["overall"]["ndcg@10"] > baseline + 0.1, (result.test["overall"]["ndcg@10"], baseline)


# ------------------------------------------------------------------------------ from the command line
def test_frozen_tower_fit_evaluate_retrieve_from_the_command_line(tmp_path):
    data = synth_dataset()
    run = tmp_path / "run"
    r = invoke(["fit", "--interactions", data.interactions, "--out", run, "--model", "bert4rec", "--items", "frozen",
                "--cache", default_settings_cache(), "--loss", "bpr", "--mask-ratio", "0.5", "--mask-last", "0.25",
                "--no-bert-head", "--dim", "16", "--max-len", "8", "--epochs", "2", "--batch-size", "64",
                "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["model"]["model"], config["model"]["mask_ratio"], config["model"]["mask_last"],
            config["model"]["bert_head"], config["train"]["windows"]) == ("bert4rec", 0.5, 0.25, False, "overlapping")
    r = invoke(["evaluate", run, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["overall"]["ndcg@10"] == pytest.approx(fitted["test"]["ndcg@10"], abs=1e-6)
    item_ids = [line.split(",")[0] for line in data.interactions.read_text().splitlines()[1:4]]
    r = invoke(["retrieve", run, "--history", ",".join(item_ids), "--k", "5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(item_ids)


def test_resume_equals_uninterrupted(tmp_path):
    hm = handmade_dataset()
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(model="bert4rec", loss="bpr", batch_size=16, patience=50)
    fit(tiny_config(hm.path, a, epochs=2, **kw))
    fit(tiny_config(hm.path, a, epochs=3, **kw), resume=True)
    fit(tiny_config(hm.path, b, epochs=3, **kw))
    assert _untimed(read_jsonl(a / "metrics.jsonl")) == _untimed(read_jsonl(b / "metrics.jsonl"))
    _assert_same_weights(_best(a), _best(b))
    _assert_same_weights(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_two_rank_fit_trains_the_one_process_model(tmp_path):
    """Under torchrun (2 ranks, gloo) the first epoch's loss is the one-process run's: both draw the
    same hidden slots and negatives for the global batch."""
    data = synth_dataset()
    args = ["--interactions", data.interactions, "--model", "bert4rec", "--loss", "bpr", "--dim", "16",
            "--max-len", "8", "--layers", "1", "--batch-size", "32", "--epochs", "1", "--dropout", "0",
            "--attn-dropout", "0", "--device", "cpu"]
    assert_two_rank_fit_equals_one(tmp_path, args)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("model, flag, value", [("sasrec", "--mask-ratio", "0.3"), ("gru4rec", "--mask-last", "0.1"),
                                                ("lightsans", "--no-bert-head", None)])
def test_cloze_options_are_refused_for_other_models(tmp_path, model, flag, value):
    r = invoke(["fit", "--interactions", synth_dataset().interactions, "--out", tmp_path / "run", "--model", model,
                flag, *([value] if value else []), "--print-config"])
    assert r.exit_code == 2
    one_error_line(r, f"is not a setting of --model {model}", "read by --model bert4rec")


@pytest.mark.parametrize("windows", ["sliding", "prefixes"])
def test_windows_cut_for_next_item_targets_are_refused(windows):
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model, cfg.train.windows = "bert4rec", windows
    with pytest.raises(PixelrecError, match=f"--windows {windows} .* --model bert4rec .* use --windows chunks or "
                                            "overlapping"):
        cfg.validate()


def test_defaults_and_the_reference_preset():
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "bert4rec"
    cfg.validate()
    assert (cfg.model.mask_ratio, cfg.model.bert_head, cfg.train.windows) == (0.2, True, "overlapping")
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "bert4rec"
    record = apply_preset(cfg, "pixelrec").validate().record()
    assert (record["model"]["mask_ratio"], record["model"]["mask_last"], record["model"]["bert_head"],
            record["loss"]["loss"], record["train"]["windows"]) == (0.6, 0.0, False, "bpr", "chunks")
    sasrec = FitConfig(interactions="i.csv", out="o").validate().record()
    assert sasrec["model"]["mask_ratio"] is None and sasrec["model"]["bert_head"] is None  # not sasrec's
