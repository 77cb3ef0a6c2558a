"""Losses, sequence encoders, item towers and the Recommender (SPEC §6, §11). Tiny dims, CPU only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import left_pad, sample_negatives
from pixelrec.recommend.losses import bpr_loss, expected_draws_log, softmax_loss
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import GRU4Rec, SASRec, SequenceConfig, build_sequence_encoder
from pixelrec.recommend.towers import IdTower, ItemTower, TableTower

ENCODERS = ["sasrec", "gru4rec"]



def seq_cfg(model: str = "sasrec", dim: int = 16, max_len: int = 8, **kw) -> SequenceConfig:
    base = dict(layers=2, heads=2, inner_mult=2, dropout=0.0, attn_dropout=0.0)
    base.update(kw)
    return SequenceConfig(model=model, dim=dim, max_len=max_len, **base)


def encoder(model: str, dim: int = 16, max_len: int = 8, seed: int = 0, **kw):
    torch.manual_seed(seed)
    enc = build_sequence_encoder(seq_cfg(model, dim, max_len, **kw))
    # random (not near-zero) output-relevant weights make differences visible
    return enc.eval()


# =============================================================================================
# losses
# =============================================================================================


def test_bpr_loss_hand_case():
    states = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # scores 2, 2
    neg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # scores 1, 0
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2
    assert bpr_loss(states, pos, neg).item() == pytest.approx(expected, rel=1e-6)


def test_bpr_loss_is_minus_log_sigmoid_of_the_margin():
    torch.manual_seed(0)
    s, p, n = torch.randn(7, 4), torch.randn(7, 4), torch.randn(7, 4)
    margin = (s * p).sum(1) - (s * n).sum(1)
    expected = -torch.log(torch.sigmoid(margin)).mean()
    assert torch.allclose(bpr_loss(s, p, n), expected, atol=1e-6)
    # swapping positive and negative changes the loss (it is not symmetric)
    assert not torch.allclose(bpr_loss(s, n, p), expected)


def test_softmax_loss_hand_case():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # logits [1,0,1], [0,1,1]
    labels = torch.tensor([0, 2])
    logq = torch.tensor([0.5, 0.0, -0.5])  # corrected logits [0.5,0,1.5], [-0.5,1,1.5]
    lse1 = math.log(math.exp(0.5) + math.exp(0.0) + math.exp(1.5))
    lse2 = math.log(math.exp(-0.5) + math.exp(1.0) + math.exp(1.5))
    expected = ((lse1 - 0.5) + (lse2 - 1.5)) / 2
    assert softmax_loss(states, cands, labels, logq).item() == pytest.approx(expected, rel=1e-6)
    plain = ((math.log(2 * math.e + 1) - 1) + (math.log(1 + 2 * math.e) - 1)) / 2
    assert softmax_loss(states, cands, labels).item() == pytest.approx(plain, rel=1e-6)


@pytest.mark.smoke
def test_softmax_loss_matches_cross_entropy():
    torch.manual_seed(1)
    s, c = torch.randn(5, 3), torch.randn(9, 3)
    labels = torch.tensor([0, 8, 3, 3, 1])
    logq = torch.randn(9)
    expected = F.cross_entropy(s @ c.T - logq, labels)
    assert torch.allclose(softmax_loss(s, c, labels, logq), expected, atol=1e-6)


def test_softmax_infinite_logq_removes_a_candidate():
    torch.manual_seed(2)
    s, c = torch.randn(4, 3), torch.randn(5, 3)
    labels = torch.tensor([1, 2, 4, 1])
    logq = torch.zeros(5)
    logq[0] = float("inf")
    full = softmax_loss(s, c, labels, logq)
    without = F.cross_entropy(s @ c[1:].T, labels - 1)
    assert torch.allclose(full, without, atol=1e-6)
    # and the removed candidate gets probability 0 (no gradient through it, no NaN)
    c = c.clone().requires_grad_(True)
    softmax_loss(s, c, labels, logq).backward()
    assert torch.isfinite(c.grad).all()
    assert torch.count_nonzero(c.grad[0]) == 0


def test_expected_draws_log_hand_case():
    pop = torch.tensor([0.0, 0.5, 0.3, 0.2])
    cand = torch.tensor([1, 3, 2])
    out = expected_draws_log(cand, pop, num_positives=4, num_uniform=10, num_items=3)
    expected = [math.log(4 * 0.5 + 10 / 3), math.log(4 * 0.2 + 10 / 3), math.log(4 * 0.3 + 10 / 3)]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_expected_draws_log_without_uniform_and_zero_popularity():
    pop = torch.tensor([0.0, 0.25, 0.75])
    out = expected_draws_log(torch.tensor([2]), pop, num_positives=8, num_uniform=0, num_items=2)
    assert out.item() == pytest.approx(math.log(6.0))
    # an item never seen in training but drawn uniformly still has a finite correction
    out = expected_draws_log(torch.tensor([0]), pop, num_positives=8, num_uniform=5, num_items=2)
    assert out.item() == pytest.approx(math.log(2.5))


# =============================================================================================
# sequence encoders
# =============================================================================================


@pytest.mark.parametrize("model", ENCODERS)
def test_encoder_output_shape(model):
    enc = encoder(model, dim=12, max_len=6, heads=3)
    out = enc(torch.randn(4, 6, 12), torch.ones(4, 6, dtype=torch.bool))
    assert out.shape == (4, 6, 12)
    # shorter windows than max_len are fine too
    assert enc(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool)).shape == (2, 3, 12)


def test_gru_hidden_size():
    enc = build_sequence_encoder(seq_cfg("gru4rec", dim=8))
    assert isinstance(enc, GRU4Rec) and enc.gru.hidden_size == 16
    enc = build_sequence_encoder(seq_cfg("gru4rec", dim=8, gru_hidden=5))
    assert enc.gru.hidden_size == 5
    assert enc(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)).shape == (2, 4, 8)


def test_build_sequence_encoder_kinds_and_errors():
    assert isinstance(build_sequence_encoder(seq_cfg("sasrec")), SASRec)
    assert isinstance(build_sequence_encoder(seq_cfg("gru4rec")), GRU4Rec)
    with pytest.raises(PixelrecError, match="caser"):
        build_sequence_encoder(seq_cfg("caser"))
    with pytest.raises(PixelrecError, match="--dim 10"):
        build_sequence_encoder(seq_cfg("sasrec", dim=10, heads=3))


@pytest.mark.parametrize("model", ENCODERS)
@pytest.mark.parametrize("pad", [0, 3])
def test_causality(model, pad):
    enc = encoder(model)
    L, d = 8, 16
    torch.manual_seed(3)
    x = torch.randn(2, L, d)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[:, :pad] = False
    x[:, :pad] = 0
    base = enc(x, mask)
    for t in range(pad, L):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, d) * 3
        out = enc(x2, mask)
        # (outputs at padded positions are never used, only real ones must be causal)
        assert torch.allclose(out[:, pad:t], base[:, pad:t], atol=1e-5), f"position {t} leaks backwards"
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-4), "changed input has no effect"


@pytest.mark.parametrize("model", ENCODERS)
def test_padding_invariance(model):
    """The same items with more or less left padding (and garbage in padded slots) give the same states."""
    enc = encoder(model, max_len=8)
    torch.manual_seed(4)
    items = torch.randn(3, 16)

    def run(L: int, garbage: bool) -> torch.Tensor:
        x = torch.randn(1, L, 16) * 5 if garbage else torch.zeros(1, L, 16)
        x[0, L - 3 :] = items
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[0, L - 3 :] = True
        return enc(x, mask)[0, L - 3 :]

    ref = run(3, False)  # no padding at all
    for L in (4, 5, 8):
        for garbage in (False, True):
            assert torch.allclose(run(L, garbage), ref, atol=1e-5), (L, garbage)


@pytest.mark.parametrize("model", ENCODERS)
def test_rows_are_independent_of_each_other(model):
    enc = encoder(model)
    torch.manual_seed(5)
    x = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, :2] = False
    together = enc(x, mask)
    for b in range(3):
        alone = enc(x[b : b + 1], mask[b : b + 1])[0]
        assert torch.allclose(alone[mask[b]], together[b, mask[b]], atol=1e-5)


@pytest.mark.parametrize("model", ENCODERS)
def test_all_padding_rows_give_no_nan(model):
    enc = encoder(model)
    torch.manual_seed(6)
    x = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0] = False  # an empty history
    mask[1, :7] = False  # a single item
    x[~mask] = 0
    out = enc(x, mask)
    assert torch.isfinite(out).all()
    single = enc(x[1:2, 7:], mask[1:2, 7:])
    assert torch.allclose(out[1, 7], single[0, 0], atol=1e-5)


@pytest.mark.parametrize("model", ENCODERS)
def test_all_padding_rows_have_finite_gradients(model):
    enc = build_sequence_encoder(seq_cfg(model)).train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 5:] = True
    enc(x, mask)[1, -1].sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in enc.parameters())


def test_sasrec_relative_positions_train_every_position_as_it_is_served():
    """With relative positions the state at window position t equals the user vector of the history
    ending there (served from the last slot of a left-padded window); with absolute ones it does not."""
    torch.manual_seed(8)
    x = torch.randn(1, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.bool)

    def served(enc, t):  # items 0..t, left-padded into the 8-slot window, state at the last slot
        xp, mp = torch.zeros(1, 8, 16), torch.zeros(1, 8, dtype=torch.bool)
        xp[0, 7 - t :], mp[0, 7 - t :] = x[0, : t + 1], True
        return enc(xp, mp)[0, -1]

    rel = encoder("sasrec", max_len=8, positions="relative")
    with torch.no_grad():
        rel.rel_bias.normal_(0, 2.0)  # distances must matter for the test to mean anything
    states = rel(x, mask)[0]
    for t in range(8):
        assert torch.allclose(states[t], served(rel, t), atol=1e-5), t

    ab = encoder("sasrec", max_len=8, positions="absolute")
    with torch.no_grad():
        ab.pos.weight.normal_(0, 1.0)
    states = ab(x, mask)[0]
    assert torch.allclose(states[7], served(ab, 7), atol=1e-5)
    assert not torch.allclose(states[3], served(ab, 3), atol=1e-3)


def test_sasrec_relative_bias_is_per_distance():
    enc = encoder("sasrec", max_len=8, positions="relative")
    torch.manual_seed(9)
    x, mask = torch.randn(1, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    base = enc(x, mask)[0]
    with torch.no_grad():
        enc.rel_bias[:, 3] += 5.0  # only keys exactly 3 items back
    out = enc(x, mask)[0]
    assert torch.allclose(out[:3], base[:3], atol=1e-6)  # positions 0..2 have no key 3 back
    assert not torch.allclose(out[3:], base[3:], atol=1e-4)


def test_sasrec_rejects_unknown_positions():
    with pytest.raises(PixelrecError, match="positions"):
        build_sequence_encoder(seq_cfg("sasrec", positions="rotary"))


def test_sasrec_positions_count_back_from_the_most_recent_item():
    enc = encoder("sasrec", max_len=8, positions="absolute")
    torch.manual_seed(7)
    x = torch.randn(1, 4, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    base = enc(x, mask)
    with torch.no_grad():
        enc.pos.weight[:4] += torch.randn(4, 16)  # positions that a 4-long window never uses
    assert torch.allclose(enc(x, mask), base, atol=1e-6)
    with torch.no_grad():
        enc.pos.weight[-1] += torch.randn(16)  # the most recent position's embedding
    assert not torch.allclose(enc(x, mask)[:, -1], base[:, -1], atol=1e-4)


@pytest.mark.parametrize("model", ENCODERS)
def test_eval_is_deterministic_and_train_mode_uses_dropout(model):
    enc = build_sequence_encoder(seq_cfg(model, dropout=0.5, attn_dropout=0.5))
    x, mask = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    enc.eval()
    assert torch.equal(enc(x, mask), enc(x, mask))
    enc.train()
    torch.manual_seed(0)
    a = enc(x, mask)
    torch.manual_seed(1)
    b = enc(x, mask)
    assert not torch.allclose(a, b)


# =============================================================================================
# towers
# =============================================================================================


def test_id_tower_padding_is_zero_and_rows_match():
    torch.manual_seed(0)
    tower = IdTower(5, 4)
    out = tower(torch.tensor([0, 3, 0, 5]))
    assert out.shape == (4, 4)
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
    assert torch.equal(out[1], tower.embedding.weight[3]) and torch.equal(out[3], tower.embedding.weight[5])
    assert tower.cheap and tower.num_items == 5 and tower.dim == 4
    allv = tower.all_vectors()
    assert allv.shape == (6, 4)
    assert torch.count_nonzero(allv[0]) == 0
    assert torch.equal(allv[1:], tower(torch.arange(1, 6)))
    assert not allv.requires_grad


def test_id_tower_padding_row_stays_zero_after_training():
    torch.manual_seed(0)
    tower = IdTower(4, 3)
    opt = torch.optim.AdamW(tower.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        loss = (tower(torch.tensor([0, 1, 2, 0])) - 1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(tower.all_vectors()[0]) == 0


def test_table_tower():
    table = torch.arange(12, dtype=torch.float64).view(4, 3)
    table[0] = 0
    tower = TableTower(table)
    assert tower.num_items == 3 and tower.dim == 3 and tower.cheap
    out = tower(torch.tensor([2, 0, 3, 1]))
    assert out.dtype == torch.float32
    assert out.tolist() == [[6, 7, 8], [0, 0, 0], [9, 10, 11], [3, 4, 5]]
    allv = tower.all_vectors()
    assert allv.shape == (4, 3) and torch.equal(allv, table.float())
    assert next(tower.parameters()).device.type == "cpu"


def test_base_tower_all_vectors_batches():
    class Lin(ItemTower):
        def __init__(self):
            super().__init__()
            self.num_items, self.dim = 10, 2
            self.w = torch.nn.Parameter(torch.ones(2))

        def encode(self, idx):
            return idx[:, None].float() * self.w

    allv = Lin().all_vectors(batch_size=3)
    assert allv.shape == (11, 2)
    assert allv[:, 0].tolist() == [0.0] + [float(i) for i in range(1, 11)]


# =============================================================================================
# Recommender
# =============================================================================================


class RecordingTower(IdTower):
    """IdTower that records every call of `encode`."""

    def __init__(self, num_items: int, dim: int, cheap: bool = True):
        super().__init__(num_items, dim)
        self.cheap = cheap
        self.calls: list[torch.Tensor] = []

    def encode(self, idx):
        self.calls.append(idx.detach().clone())
        return super().encode(idx)


def make_model(num_items=12, dim=16, max_len=4, model="sasrec", loss="softmax", negatives=0,
               popularity=None, tower=None, seed=0, **kw):
    torch.manual_seed(seed)
    tower = tower or IdTower(num_items, dim)
    enc = build_sequence_encoder(seq_cfg(model, dim, max_len, layers=1, **kw))
    return Recommender(tower, enc, max_len, LossConfig(loss=loss, negatives=negatives), popularity=popularity)


BATCH = torch.tensor([
    [0, 0, 3, 5, 7],
    [2, 4, 6, 8, 10],
    [0, 9, 3, 11, 12],
])


def test_loss_config():
    cheap, costly = IdTower(10, 2), RecordingTower(10, 2, cheap=False)
    assert LossConfig().use_full_softmax(cheap)
    assert not LossConfig(negatives=5).use_full_softmax(cheap)
    assert not LossConfig().use_full_softmax(costly)
    # resolved choices (build_recommender resolves auto by the cost rule: tests/test_loss_choice.py)
    assert not LossConfig(softmax="sampled").use_full_softmax(cheap)
    assert LossConfig(softmax="full").use_full_softmax(cheap)
    assert LossConfig().uniform_negatives() == 1024 and LossConfig(negatives=7).uniform_negatives() == 7


def check_backward(model, loss):
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    emb = model.tower.embedding.weight.grad
    assert torch.count_nonzero(emb[0]) == 0  # padding never learns
    assert any(torch.count_nonzero(g) > 0 for g in grads[1:])  # the encoder learns too


@pytest.mark.parametrize("model_name", ENCODERS)
@pytest.mark.parametrize("loss,negatives", [("softmax", 0), ("softmax", 5), ("bpr", 0)])
def test_training_loss_finite_and_backprop(model_name, loss, negatives):
    model = make_model(model=model_name, loss=loss, negatives=negatives).train()
    gen = torch.Generator().manual_seed(0)
    neg = sample_negatives(BATCH, 12, gen) if loss == "bpr" else None
    check_backward(model, model.training_loss(BATCH, neg, gen))


def test_full_softmax_equals_hand_built_cross_entropy():
    model = make_model(num_items=6, dim=8, max_len=4).eval()
    seq = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 1, 2], [0, 0, 0, 6, 6]])
    W = model.tower.embedding.weight  # row 0 = padding
    inputs, targets = seq[:, :-1], seq[:, 1:]
    states = model.encoder(W[inputs], inputs != 0)
    terms = []
    for b in range(3):
        for t in range(4):
            if inputs[b, t] == 0:
                continue
            logits = W[1:] @ states[b, t]  # items 1..6 only: padding is no candidate
            terms.append(torch.logsumexp(logits, 0) - logits[targets[b, t] - 1])
    assert len(terms) == 2 + 4 + 1
    expected = torch.stack(terms).mean()
    assert torch.allclose(model.training_loss(seq), expected, atol=1e-5)


def test_bpr_equals_hand_built_loss():
    model = make_model(num_items=6, dim=8, max_len=4, loss="bpr").eval()
    seq = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 1, 2]])
    neg = torch.tensor([[5, 5, 6, 4], [3, 3, 3, 3]])
    W = model.tower.embedding.weight
    inputs, targets = seq[:, :-1], seq[:, 1:]
    states = model.encoder(W[inputs], inputs != 0)
    terms = []
    for b in range(2):
        for t in range(4):
            if inputs[b, t] != 0:
                margin = states[b, t] @ W[targets[b, t]] - states[b, t] @ W[neg[b, t]]
                terms.append(-F.logsigmoid(margin))
    expected = torch.stack(terms).mean()
    assert torch.allclose(model.training_loss(seq, neg), expected, atol=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_trained_counts_restrict_the_loss_to_each_windows_newest_targets(loss):
    model = make_model(num_items=12, dim=8, max_len=4, loss=loss).eval()
    trained = torch.tensor([1, 4, 2])  # window 0: its last target; 1: all four; 2: the last two
    neg = sample_negatives(BATCH, 12, torch.Generator().manual_seed(0)) if loss == "bpr" else None
    got = model.training_loss(BATCH, neg, None, trained)
    # the same as the mean over those positions computed one position at a time
    W = model.tower.embedding.weight
    inputs, targets = BATCH[:, :-1], BATCH[:, 1:]
    states = model.encoder(W[inputs], inputs != 0)
    terms = []
    for b, k in enumerate(trained.tolist()):
        for t in range(4 - k, 4):
            if inputs[b, t] == 0:
                continue
            if loss == "softmax":
                logits = W[1:] @ states[b, t]
                terms.append(torch.logsumexp(logits, 0) - logits[targets[b, t] - 1])
            else:
                terms.append(-F.logsigmoid(states[b, t] @ (W[targets[b, t]] - W[neg[b, t]])))
    assert len(terms) == 1 + 4 + 2
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    # all targets trained = no counts given
    assert torch.allclose(model.training_loss(BATCH, neg, None, torch.tensor([4, 4, 4])),
                          model.training_loss(BATCH, neg), atol=1e-6)


def test_sampled_softmax_equals_hand_built_loss():
    N = 12
    pop = torch.tensor([0.0] + [float(i) for i in range(1, N + 1)])
    pop = pop / pop.sum()
    model = make_model(num_items=N, dim=8, max_len=4, negatives=6, popularity=pop).eval()
    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    loss = model.training_loss(BATCH, None, gen)

    uniform = torch.randint(1, N + 1, (6,), generator=replay)
    W = model.tower.embedding.weight
    inputs, targets = BATCH[:, :-1], BATCH[:, 1:]
    mask = inputs != 0
    states = model.encoder(W[inputs], mask)[mask]
    pos = targets[mask]
    cand = sorted(set(pos.tolist()) | set(uniform.tolist()))
    logq = torch.log(len(pos) * pop[cand] + 6 / N)
    logits = states @ W[cand].T - logq
    labels = torch.tensor([cand.index(int(p)) for p in pos])
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(loss, expected, atol=1e-5)


def _flat(calls):
    return torch.cat(calls).tolist()


def test_bpr_tower_runs_once_on_unique_items():
    tower = RecordingTower(12, 8)
    model = make_model(tower=tower, dim=8, loss="bpr")
    neg = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [4, 4, 2, 2]])
    model.training_loss(BATCH, neg)
    assert len(tower.calls) == 1, "the tower must run once per step"
    encoded = tower.calls[0].tolist()
    assert len(encoded) == len(set(encoded)), f"duplicates in {encoded}"
    union = (set(BATCH.flatten().tolist()) | set(neg.flatten().tolist())) - {0}
    assert set(encoded) == union


def test_bpr_tower_does_not_encode_padding_as_an_item():
    # item 1 is nowhere in the batch: the tower should not be asked for it (it only pads)
    tower = RecordingTower(12, 8)
    model = make_model(tower=tower, dim=8, loss="bpr")
    neg = torch.tensor([[2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 2, 2]])
    model.training_loss(BATCH, neg)
    encoded = _flat(tower.calls)
    assert 1 not in encoded
    assert sorted(encoded) == sorted((set(BATCH.flatten().tolist()) | {2, 3, 4}) - {0})


def test_sampled_softmax_tower_runs_once_on_unique_items():
    tower = RecordingTower(40, 8)
    model = make_model(tower=tower, dim=8, negatives=5)
    gen = torch.Generator().manual_seed(0)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    model.training_loss(BATCH, None, gen)
    uniform = set(torch.randint(1, 41, (5,), generator=replay).tolist())
    assert len(tower.calls) == 1
    encoded = tower.calls[0].tolist()
    assert len(encoded) == len(set(encoded)), f"duplicates in {encoded}"
    assert set(encoded) == (set(BATCH.flatten().tolist()) | uniform) - {0}


def test_full_softmax_tower_runs_once_on_every_item():
    tower = RecordingTower(12, 8)
    model = make_model(tower=tower, dim=8)
    model.training_loss(BATCH)
    assert len(tower.calls) == 1
    assert sorted(tower.calls[0].tolist()) == list(range(1, 13))


def test_costly_tower_uses_sampled_softmax():
    tower = RecordingTower(3000, 4, cheap=False)
    model = make_model(tower=tower, dim=4)
    model.training_loss(BATCH, None, torch.Generator().manual_seed(0))
    assert len(tower.calls) == 1
    assert len(set(tower.calls[0].tolist())) < 3000  # not the whole catalogue


def _consecutive_data(num_items: int, length: int):
    """Every user's sequence runs through the catalogue in order: i -> i + 1 (mod N)."""
    seqs = [[(s + k) % num_items + 1 for k in range(length)] for s in range(num_items)]
    return torch.tensor(seqs)


@pytest.mark.parametrize("model_name,loss,negatives", [
    ("sasrec", "softmax", 0),
    ("sasrec", "bpr", 0),
    ("gru4rec", "softmax", 6),
    ("gru4rec", "bpr", 0),
])
def test_learning_ranks_the_true_next_item_first(model_name, loss, negatives):
    N, L = 10, 4
    model = make_model(num_items=N, dim=16, max_len=L, model=model_name, loss=loss, negatives=negatives, seed=0)
    windows = _consecutive_data(N, L + 1)  # [N, L + 1]: one window per starting item
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        neg = sample_negatives(windows, N, gen) if loss == "bpr" else None
        loss_value = model.training_loss(windows, neg, gen)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    model.eval()
    if loss == "bpr":
        # PixelRec's BPR never uses a window's own items as negatives, so it only learns to rank the
        # target above items outside the window: evaluate full windows, history excluded (SPEC §7)
        lengths, exclude = (L,), True
    else:
        lengths, exclude = (1, 2, L), False
    histories = [np.array([(s + k) % N + 1 for k in range(h)]) for s in range(N) for h in lengths]
    table = model.tower.all_vectors()
    users = torch.from_numpy(model.encode_histories(histories, item_table=table))
    scores = users @ table.T
    scores[:, 0] = -math.inf
    if exclude:
        for r, h in enumerate(histories):
            scores[r, torch.from_numpy(h)] = -math.inf
    top = scores.argmax(1).tolist()
    expected = [int(h[-1]) % N + 1 for h in histories]
    assert top == expected


def test_untrained_model_does_not_rank_perfectly():
    # the learning test above is not vacuous: before training the next item is not always first
    N, L = 10, 4
    model = make_model(num_items=N, dim=16, max_len=L).eval()
    histories = [np.array([(s + k) % N + 1 for k in range(L)]) for s in range(N)]
    table = model.tower.all_vectors()
    scores = torch.from_numpy(model.encode_histories(histories, item_table=table)) @ table.T
    scores[:, 0] = -math.inf
    assert scores.argmax(1).tolist() != [int(h[-1]) % N + 1 for h in histories]


def test_user_vectors_is_the_last_state():
    model = make_model(num_items=6, dim=8).eval()
    seq = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]])
    W = model.tower.embedding.weight
    expected = model.encoder(W[seq], seq != 0)[:, -1]
    assert torch.allclose(model.user_vectors(seq), expected, atol=1e-6)
    assert torch.allclose(model.user_vectors(seq, W.detach()), expected, atol=1e-6)


@pytest.mark.parametrize("model_name", ENCODERS)
def test_encode_histories_with_item_table_equals_tower_path(model_name):
    model = make_model(num_items=12, dim=8, max_len=4, model=model_name).eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 13, n) for n in (1, 2, 3, 4, 5, 9, 2, 7)]
    table = model.tower.all_vectors()
    a = model.encode_histories(histories)
    b = model.encode_histories(histories, item_table=table, batch_size=3)
    assert a.dtype == np.float32 and a.shape == (8, 8)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # longer histories only use their last max_len items
    trunc = model.encode_histories([h[-4:] for h in histories], item_table=table)
    np.testing.assert_allclose(trunc, b, atol=1e-6)
    # and the batch path equals one history at a time
    single = np.concatenate([model.encode_histories([h]) for h in histories])
    np.testing.assert_allclose(single, a, atol=1e-5)
    # a TableTower over the same vectors gives the same users (the serving path)
    served = Recommender(TableTower(table), model.encoder, 4, LossConfig()).eval()
    np.testing.assert_allclose(served.encode_histories(histories), a, atol=1e-6)


def test_encode_histories_empty_inputs():
    model = make_model(num_items=5, dim=8).eval()
    assert model.encode_histories([]).shape == (0, 8)
    out = model.encode_histories([np.array([], dtype=np.int64), np.array([2])])
    assert out.shape == (2, 8) and np.isfinite(out).all()


def test_left_pad_feeds_user_vectors():
    model = make_model(num_items=6, dim=8, max_len=4).eval()
    h = [np.array([1, 2, 3, 4, 5, 6]), np.array([3])]
    seq = torch.from_numpy(left_pad(h, 4))
    np.testing.assert_allclose(model.encode_histories(h), model.user_vectors(seq).detach().numpy(), atol=1e-6)
