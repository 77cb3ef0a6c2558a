"""The class-token-only last block of `partial` and `e2e` (pixelrec/recommend/image_towers.py).

When the item vector reads only the class token (a ViT's 'model' pooling with token pooling, under the
`pooled` / `pooled_relu` heads), the last block runs its query, output projection and MLP for that
token alone. It must be exact: item vectors, the training loss, its gradients and a few optimiser
steps equal the full last block to 1e-5, on the tiny ViT with dropout off. Other poolings, heads and
families take the full path (checked on the tower's flag and on the function actually called).
"""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from fixtures_images import DIM, SPLIT, TINY_VIT, seq_config, ds, data, store  # noqa: F401 (fixtures)
from pixelrec.encode.cache import open_cache
from pixelrec.encode.encoder import EncoderConfig, build_encoder
from pixelrec.recommend import image_towers
from pixelrec.recommend.batches import iterate_batches, training_windows
from pixelrec.recommend.image_towers import E2ETower, PartialTower, cls_only_block
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import build_sequence_encoder

TOL = 1e-5
TINY_RN, RN_SIZE, RN_K = "pixelrec-tiny-rn", 64, 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (exact up to float32 rounding: ~1e-7)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def tower_pair(kind: str, ds, data, store, head: str = "pooled"):
    """(new, old): the same tower twice, the copy forced onto the full last block."""
    torch.manual_seed(0)
    if kind == "partial":
        new = PartialTower(open_cache(ds.cache("model")), data, DIM, head=head)
        old = copy.deepcopy(new)
    else:  # the encoder's random init is seeded: two builds hold the same weights
        new, old = (E2ETower(build_encoder(EncoderConfig(model=TINY_VIT)), store, data, DIM, head=head,
                             tune_blocks=SPLIT) for _ in range(2))
        old.head.load_state_dict(new.head.state_dict())
    old.cls_only = False
    return new, old


def test_cls_only_block_equals_the_blocks_class_token_output():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64)
    for ls in (None, 0.1):  # with and without LayerScale
        block = ResidualAttentionBlock(64, 4, ls_init_value=ls).eval()
        full = block(x)[:, :1]
        got = cls_only_block(block, x)
        assert got.shape == (3, 1, 64)
        assert rel(got, full) < TOL
        assert rel(cls_only_block(block, x.flip(1)), full) > 1e-2  # control: another token first differs


@pytest.mark.parametrize("kind", ["partial", "e2e"])
@pytest.mark.parametrize("head", ["pooled", "pooled_relu"])
def test_item_vectors_equal_the_full_last_block(ds, data, store, kind, head):
    new, old = tower_pair(kind, ds, data, store, head)
    assert new.cls_only and not old.cls_only
    idx = torch.arange(1, data.num_items + 1)
    with torch.no_grad():
        a, b = new(idx), old(idx)
    assert a.shape == (data.num_items, DIM) and b.abs().max() > 0.1
    assert rel(a, b) < TOL


def first_batch(data, size: int = 32) -> torch.Tensor:
    windows = training_windows(data, 10, "sliding", 5)
    return next(iter(iterate_batches(windows, size, torch.Generator().manual_seed(0))))[0]


@pytest.mark.parametrize("kind", ["partial", "e2e"])
def test_training_loss_gradients_and_steps_equal_the_full_last_block(ds, data, store, kind):
    new, old = tower_pair(kind, ds, data, store)
    torch.manual_seed(3)
    seq_enc = build_sequence_encoder(seq_config(dropout=0.0, attn_dropout=0.0))
    models = [Recommender(t, copy.deepcopy(seq_enc), max_len=10, loss=LossConfig(loss="softmax", negatives=16))
              for t in (new, old)]
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in models]
    seq = first_batch(data)
    for step in range(3):
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = m.training_loss(seq, None, torch.Generator().manual_seed(step))
            loss.backward()
            losses.append(loss)
        assert losses[0].item() > 0.01
        assert abs(losses[0].item() - losses[1].item()) < TOL * abs(losses[1].item()), step
        if step == 0:  # every trainable parameter, the last block's included, gets the same gradient
            pairs = list(zip(models[0].named_parameters(), models[1].parameters()))
            trained = [(n, a, b) for (n, a), b in pairs if a.requires_grad and a.grad is not None]
            assert any(".attn.in_proj_weight" in n for n, _, _ in trained)
            for name, a, b in trained:
                assert rel(a.grad, b.grad) < 1e-4, name  # a gradient's small entries carry rounding of ~1e-6
        for opt in opts:
            opt.step()


def test_grad_checkpointing_keeps_the_cls_only_path_exact(ds, data, store):
    new, old = tower_pair("partial", ds, data, store)
    new.top.set_grad_checkpointing(True)
    idx = torch.arange(1, 20)
    a, b = new(idx), old(idx)
    assert rel(a, b) < TOL
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, pa), pb in zip(new.top.named_parameters(), old.top.parameters()):
        assert rel(pa.grad, pb.grad) < 1e-4, name


class Calls:
    """Counts calls of image_towers.cls_only_block (patched by monkeypatch)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = image_towers.cls_only_block

        def counted(block, x):
            self.n += 1
            return original(block, x)

        monkeypatch.setattr(image_towers, "cls_only_block", counted)


def test_the_cls_only_path_is_the_one_that_runs(ds, data, store, monkeypatch):
    calls = Calls(monkeypatch)
    new, old = tower_pair("partial", ds, data, store)
    with torch.no_grad():
        old(torch.arange(1, 5))
        assert calls.n == 0
        new(torch.arange(1, 5))
    assert calls.n == 1


def test_other_poolings_heads_and_families_take_the_full_path(ds, data, store, monkeypatch, tmp_path):
    calls = Calls(monkeypatch)
    mean_cache = open_cache(ds.cache("mean"))  # 'mean' pooling reads every token
    towers = {
        "partial, mean pooling": PartialTower(mean_cache, data, DIM, head="pooled"),
        "partial, token_relu_mean": PartialTower(mean_cache, data, DIM, head="token_relu_mean"),
        "partial, token_relu_mean on a model cache": PartialTower(open_cache(ds.cache("model")), data, DIM,
                                                                  head="token_relu_mean"),
        "e2e, mean pooling": E2ETower(build_encoder(EncoderConfig(model=TINY_VIT, pooling="mean")), store, data, DIM,
                                      tune_blocks=SPLIT),
        "e2e, resnet": E2ETower(build_encoder(EncoderConfig(model=TINY_RN, image_size=RN_SIZE)), None, data, DIM,
                                tune_blocks=RN_K),
    }
    for name, tower in towers.items():
        assert not tower.cls_only, name
    with torch.no_grad():
        for name, tower in towers.items():
            if isinstance(tower, PartialTower):
                tower(torch.arange(1, 5))
            else:
                tower.eval().from_pixels(torch.randn(2, 3, tower.encoder.image_size, tower.encoder.image_size))
    assert calls.n == 0
    monkeypatch.setattr(image_towers, "CLS_ONLY_LAST_BLOCK", False)  # the switch benchmarks/fit_cost.py --cls-only uses
    assert not PartialTower(open_cache(ds.cache("model")), data, DIM).cls_only
