"""Image item towers (SPEC §6, §11): frozen, partial, e2e (PixelNet) and hybrid, on the tiny ViT.

The central property: `partial` (cached split-block tokens -> the last K blocks) computes the same
item vectors and the same training loss as `e2e` (raw covers -> the encoder with only its top K
blocks trainable) given the same weights, up to the cache's float16 rounding; and a training step
encodes every unique item of the batch once, never padding.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from fixtures_images import DIM, SPLIT, TINY_VIT, seq_config, ds, data, store  # noqa: F401 (fixtures)
from pixelrec.data.sequences import build_sequences
from pixelrec.encode.cache import open_cache
from pixelrec.encode.encoder import EncoderConfig, build_encoder
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import iterate_batches, sample_negatives, training_windows
from pixelrec.recommend.build import build_optimizer, build_recommender
from pixelrec.recommend.config import FitConfig, ItemsConfig, TrainConfig
from pixelrec.recommend.image_towers import FrozenTower, HybridTower, PartialTower, E2ETower, build_image_tower
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import build_sequence_encoder
from pixelrec.recommend.towers import IdTower
from pixelrec.runtime import set_quiet

# partial vs e2e: max |difference| of item vectors relative to their mean L2 norm. Measured on this
# data: 1.9e-4 (pooled head, cached pixels), 0.5e-4 .. 0.9e-4 (mean pooling); a different encoder
# gives differences of the order of the norm itself.
REL_TOL = 1e-3

HEADS = [("pooled", "model"), ("token_relu_mean", "mean")]  # (head, cache/encoder pooling)



def tiny_encoder(pooling: str = "model", seed: int = 0):
    return build_encoder(EncoderConfig(model=TINY_VIT, pooling=pooling, seed=seed))


def twin_towers(ds, data, store, head: str, pooling: str, in_memory: str = "auto", encoder_seed: int = 0):
    """A partial tower on the cache and an e2e tower (top 2 blocks trainable) with identical head weights."""
    cache = open_cache(ds.cache(pooling))
    torch.manual_seed(0)
    partial = PartialTower(cache, data, DIM, head=head)
    pixel = E2ETower(tiny_encoder(pooling, encoder_seed), store, data, DIM, head=head, tune_blocks=SPLIT,
                       in_memory=in_memory)
    pixel.head.load_state_dict(partial.head.state_dict())
    return partial, pixel


def first_batch(data, size: int = 48, seed: int = 0, max_len: int = 10) -> torch.Tensor:
    windows = training_windows(data, max_len, "sliding", max_len // 2)
    return next(iter(iterate_batches(windows, size, torch.Generator().manual_seed(seed))))[0]


def recommender(tower, seq_encoder, loss: str = "softmax", negatives: int = 0) -> Recommender:
    return Recommender(tower, copy.deepcopy(seq_encoder), max_len=10, loss=LossConfig(loss=loss, negatives=negatives))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.norm(dim=-1).mean())


# =============================================================================================
# partial == e2e (SPEC §6)
# =============================================================================================


@pytest.mark.parametrize("head,pooling", HEADS)
@pytest.mark.parametrize("in_memory", ["auto", "no"])
def test_partial_and_e2e_give_the_same_item_vectors(ds, data, store, head, pooling, in_memory):
    partial, pixel = twin_towers(ds, data, store, head, pooling, in_memory)
    idx = torch.arange(1, data.num_items + 1)
    with torch.no_grad():
        a, b = partial(idx), pixel(idx)
    assert a.shape == b.shape == (data.num_items, DIM)
    assert b.norm(dim=-1).min() > 0.1  # not trivially zero
    assert rel_diff(a, b) < REL_TOL


@pytest.mark.parametrize("head,pooling", HEADS)
def test_the_tolerance_separates_another_encoder(ds, data, store, head, pooling):
    """Control: an e2e tower over another random encoder is far outside the tolerance."""
    partial, other = twin_towers(ds, data, store, head, pooling, encoder_seed=1)
    idx = torch.arange(1, 41)
    with torch.no_grad():
        assert rel_diff(partial(idx), other(idx)) > 50 * REL_TOL


@pytest.mark.parametrize("head,pooling", HEADS)
@pytest.mark.parametrize("loss,negatives", [("softmax", 16), ("bpr", 0)])
def test_partial_and_e2e_give_the_same_training_loss_and_gradients(ds, data, store, head, pooling, loss, negatives):
    partial, pixel = twin_towers(ds, data, store, head, pooling)
    torch.manual_seed(3)
    seq_enc = build_sequence_encoder(seq_config(dropout=0.0, attn_dropout=0.0))
    mp, me = recommender(partial, seq_enc, loss, negatives), recommender(pixel, seq_enc, loss, negatives)
    seq = first_batch(data)
    neg = sample_negatives(seq, data.num_items, torch.Generator().manual_seed(1)) if loss == "bpr" else None
    lp = mp.training_loss(seq, neg, torch.Generator().manual_seed(7))
    le = me.training_loss(seq, neg, torch.Generator().manual_seed(7))
    assert torch.isfinite(lp) and lp.item() > 0.01
    assert abs(lp.item() - le.item()) < 2.5e-4 * abs(le.item())  # measured <= 2.4e-5
    lp.backward()
    le.backward()
    # the head and the sequence encoder receive the same gradients (measured max rel diff <= 3.4e-3) ...
    for (name, gp), ge in zip(mp.tower.head.named_parameters(), me.tower.head.parameters()):
        assert rel_grad(gp.grad, ge.grad) < 1e-2, name
    for (name, gp), ge in zip(mp.encoder.named_parameters(), me.encoder.parameters()):
        assert rel_grad(gp.grad, ge.grad) < 1e-2, name
    # ... and so do the tuned top blocks (partial: all of TopBlocks; e2e: the encoder's last 2 blocks)
    e2e_top = pixel.encoder.visual.transformer.resblocks[-SPLIT:]
    for (name, gp), ge in zip(partial.top.blocks.named_parameters(), e2e_top.parameters()):
        assert rel_grad(gp.grad, ge.grad) < 1e-2, name


def rel_grad(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a is not None and b is not None
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-8))


# =============================================================================================
# each unique item encoded once per step, padding never (SPEC §6, §11)
# =============================================================================================


class Recorder:
    """Forward pre-hook recording the batch size of every call."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        module.register_forward_pre_hook(lambda _m, args: self.sizes.append(int(args[0].shape[0])))


def wrap_indices(obj, name: str, calls: list):
    """Record the item indices passed to obj.<name>(idx, ...)."""
    original = getattr(obj, name)

    def wrapped(idx, *a, **kw):
        calls.append(idx.clone())
        return original(idx, *a, **kw)

    setattr(obj, name, wrapped)


def expected_items(seq, neg, data, loss, negatives, gen_seed) -> set[int]:
    items = set(seq[seq != 0].tolist())
    if loss == "bpr":
        items |= set(neg[seq[:, :-1] != 0].tolist())  # negatives only where a position has a target
    else:  # uniform negatives come from the known items: all of 1..N for a Recommender built without popularity
        known = torch.arange(1, data.num_items + 1)
        pick = torch.randint(0, len(known), (negatives,), generator=torch.Generator().manual_seed(gen_seed))
        items |= set(known[pick].tolist())
    items.discard(0)
    return items


@pytest.mark.parametrize("kind", ["partial", "e2e"])
@pytest.mark.parametrize("loss,negatives", [("softmax", 16), ("bpr", 0)])
def test_each_unique_item_is_encoded_once_per_step(ds, data, store, kind, loss, negatives):
    partial, pixel = twin_towers(ds, data, store, "pooled", "model")
    tower = partial if kind == "partial" else pixel
    calls: list[torch.Tensor] = []
    if kind == "partial":
        wrap_indices(tower, "read_tokens", calls)
        rec = Recorder(tower.top.blocks[0])  # (the first tuned block: the class-token-only path skips top.forward)
    else:
        wrap_indices(tower.pixels, "get", calls)
        rec = Recorder(tower.encoder.visual.transformer.resblocks[0])
    torch.manual_seed(0)
    model = recommender(tower, build_sequence_encoder(seq_config()), loss, negatives)
    seq = first_batch(data, size=32)
    assert (seq == 0).any(), "the batch should hold padding"
    neg = sample_negatives(seq, data.num_items, torch.Generator().manual_seed(1)) if loss == "bpr" else None
    model.training_loss(seq, neg, torch.Generator().manual_seed(5)).backward()

    want = expected_items(seq, neg, data, loss, negatives, 5)
    assert len(calls) == 1 and rec.sizes == [len(want)]  # one encoder call on the unique items
    got = calls[0].tolist()
    assert 0 not in got  # padding is never encoded
    assert len(got) == len(set(got))  # no item twice
    assert set(got) == want
    assert len(want) < (seq != 0).sum()  # (a real saving: positions repeat items)


def test_user_vectors_encode_unique_history_items_only(ds, data, store):
    partial, _ = twin_towers(ds, data, store, "pooled", "model")
    calls: list[torch.Tensor] = []
    wrap_indices(partial, "read_tokens", calls)
    torch.manual_seed(0)
    model = recommender(partial, build_sequence_encoder(seq_config())).eval()
    seq = first_batch(data, size=16)[:, 1:]
    with torch.no_grad():
        model.user_vectors(seq)
    got = calls[0].tolist()
    assert 0 not in got and sorted(got) == sorted(set(seq[seq != 0].tolist()))


# =============================================================================================
# frozen tower
# =============================================================================================


def test_frozen_vectors_are_the_adapter_of_the_cached_embedding(ds, data):
    cache = open_cache(ds.cache())
    tower = FrozenTower(cache, data, DIM)
    assert tower.embeddings.dtype == torch.float16  # the float16 cache stays float16 in memory
    assert tower.missing == 0
    idx = torch.tensor([3, 1, 77, 3, data.num_items])
    rows = cache.rows_for(data.item_ids[idx.numpy()])
    cached = torch.from_numpy(cache.read_embeddings(rows))  # float32 view of the float16 values
    with torch.no_grad():
        assert torch.equal(tower(idx), tower.adapter(cached))
        assert torch.equal(tower(torch.tensor([0, 5]))[0], torch.zeros(DIM))  # padding -> zeros
    assert tower.cheap and LossConfig().use_full_softmax(tower)
    # only the adapter trains
    assert {n for n, p in tower.named_parameters() if p.requires_grad} == {"adapter.net.weight", "adapter.net.bias"}


def test_frozen_tower_keeps_a_float32_cache_in_float32(ds, data, tmp_path):
    from pixelrec.encode.pipeline import EncodeConfig, encode_images

    out = tmp_path / "f32.h5"
    encode_images(EncodeConfig(images=str(ds.covers), out=str(out), encoder=EncoderConfig(model=TINY_VIT),
                               float32=True, num_workers=0, device="cpu"))
    f32, f16 = open_cache(out), open_cache(ds.cache())
    tower = FrozenTower(f32, data, DIM)
    assert tower.embeddings.dtype == torch.float32
    rows = f32.rows_for(data.item_ids[1:])
    assert np.array_equal(tower.embeddings[1:].numpy(), f32.read_embeddings(rows))
    # and the float16 cache holds exactly these values rounded to float16
    assert np.array_equal(f16.read_embeddings(f16.rows_for(data.item_ids[1:])),
                          f32.read_embeddings(rows).astype(np.float16).astype(np.float32))


def test_items_missing_from_the_cache_get_a_zero_input_and_are_counted(ds, data, capsys):
    df = pd.read_csv(ds.interactions, dtype={"item_id": str, "user_id": str})
    users = sorted(df.user_id.unique())[:2]
    extra = pd.DataFrame({"item_id": ["zz_no_image_1"] * 3 + ["zz_no_image_2"] * 3,
                                           "user_id": [users[0]] * 3 + [users[1]] * 3,
                                           "timestamp": [10**12 + t for t in range(6)]})
    data2 = build_sequences(pd.concat([df, extra], ignore_index=True))
    assert data2.num_items == data.num_items + 2
    set_quiet(False)
    try:
        tower = FrozenTower(open_cache(ds.cache()), data2, DIM)
    finally:
        set_quiet(True)
    assert tower.missing == 2
    captured = capsys.readouterr()
    assert "2 of" in captured.out + captured.err
    with torch.no_grad():
        tower.adapter.net.bias.fill_(0.25)
        missing = torch.tensor([data2.item_index["zz_no_image_1"], data2.item_index["zz_no_image_2"]])
        assert torch.equal(tower.embeddings[missing].float(), torch.zeros(2, tower.embeddings.shape[1]))
        assert torch.allclose(tower(missing), torch.full((2, DIM), 0.25))  # adapter(0) = its bias
        assert not torch.allclose(tower(torch.tensor([1])), torch.full((1, DIM), 0.25))


def test_frozen_training_uses_the_full_softmax(ds, data):
    tower = FrozenTower(open_cache(ds.cache()), data, DIM)
    calls: list[torch.Tensor] = []
    wrap_indices(tower, "encode", calls)
    torch.manual_seed(0)
    model = recommender(tower, build_sequence_encoder(seq_config()))
    loss = model.training_loss(first_batch(data, size=16), None, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert len(calls) == 1 and calls[0].tolist() == list(range(1, data.num_items + 1))  # every item, no padding


# =============================================================================================
# partial tower: starts from the cache's exact weights; optimiser groups
# =============================================================================================


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_partial_top_blocks_reproduce_the_cached_embeddings(ds, data, pooling):
    cache = open_cache(ds.cache(pooling))
    tower = PartialTower(cache, data, DIM)
    # exact weights: those stored in the cache, and those of the encoder's last 2 blocks
    encoder_top = tiny_encoder(pooling).top_blocks(SPLIT).state_dict()
    top = tower.top.state_dict()
    assert set(top) == set(encoder_top) and all(torch.equal(top[k], encoder_top[k]) for k in top)
    rows = np.arange(len(cache))
    tokens = torch.from_numpy(cache.read_tokens(rows)).float()
    cached = torch.from_numpy(cache.read_embeddings(rows))
    with torch.no_grad():
        out = tower.top(tokens)
    # float16 tokens in, float16 embeddings stored: measured max |diff| / mean norm ~ 2e-4
    assert rel_diff(out, cached) < REL_TOL


def test_partial_encoder_parameters_get_the_encoder_learning_rate(ds, data, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="partial", cache=str(ds.cache())), model=seq_config(),
                    train=TrainConfig(lr=2e-3, weight_decay=0.01, encoder_lr=3e-5, encoder_weight_decay=0.07))
    model = build_recommender(cfg, data)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    enc = groups["encoder"]
    assert enc["lr"] == 3e-5 and enc["weight_decay"] == 0.07
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.tower.top.parameters()}
    others = [p for name, g in groups.items() if name != "encoder" for p in g["params"]]
    assert all(g["lr"] == 2e-3 for name, g in groups.items() if name != "encoder")
    assert {id(p) for p in model.tower.head.parameters()} <= {id(p) for p in others}  # the head is no encoder


def test_partial_needs_a_cache_with_tokens(ds, data, tmp_path):
    from pixelrec.encode.pipeline import EncodeConfig, encode_images

    out = tmp_path / "notokens.h5"
    encode_images(EncodeConfig(images=str(ds.covers), out=str(out), encoder=EncoderConfig(model=TINY_VIT),
                               num_workers=0, device="cpu"))
    with pytest.raises(PixelrecError, match="split-block"):
        PartialTower(open_cache(out), data, DIM)


# =============================================================================================
# e2e: only the top K blocks train
# =============================================================================================


def trainable(encoder) -> set[str]:
    return {n for n, p in encoder.visual.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head,pooling", HEADS)
def test_e2e_tune_blocks_freezes_all_but_the_top_blocks(ds, data, store, head, pooling):
    tower = E2ETower(tiny_encoder(pooling), store, data, DIM, head=head, tune_blocks=SPLIT)
    names = trainable(tower.encoder)
    blocks = {n.split(".")[2] for n in names if n.startswith("transformer.resblocks.")}
    assert blocks == {"2", "3"}
    rest = {n for n in names if not n.startswith("transformer.resblocks.")}
    if pooling == "model":  # open_clip's pooling head (ln_post, proj) is part of the function: trainable
        assert rest == {"ln_post.weight", "ln_post.bias", "proj"}
    else:  # mean pooling uses no head weights: nothing else trains
        assert rest == set()
    assert {id(p) for p in tower.encoder_parameters()} == {id(p) for p in tower.encoder.parameters() if p.requires_grad}
    all_tower = E2ETower(tiny_encoder(pooling), None, data, DIM, head=head, tune_blocks=-1)
    assert trainable(all_tower.encoder) >= {"conv1.weight", "class_embedding", "positional_embedding"}
    with pytest.raises(PixelrecError, match="tune-blocks 5"):
        E2ETower(tiny_encoder(pooling), None, data, DIM, head=head, tune_blocks=5)


def test_an_e2e_training_step_changes_only_the_top_blocks(ds, data, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="e2e", images=str(ds.covers), encoder=TINY_VIT, tune_blocks=SPLIT),
                    model=seq_config(), train=TrainConfig(lr=1e-2, encoder_lr=1e-2))
    model = build_recommender(cfg, data)
    visual = model.tower.encoder.visual
    before = {n: p.detach().clone() for n, p in visual.named_parameters()}
    opt = build_optimizer(model, cfg)
    model.train()
    loss = model.training_loss(first_batch(data, size=32), None, torch.Generator().manual_seed(0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = dict(visual.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed, "nothing trained"
    for n in before:
        top = n.startswith(("transformer.resblocks.2.", "transformer.resblocks.3.", "ln_post.", "proj"))
        if top and n.endswith("weight") or n == "proj":
            assert n in changed, n
        if not top:
            assert n not in changed, n  # frozen: patch embedding, positions, blocks 0-1


def test_build_image_tower_e2e_uses_mean_pooling_for_the_token_head(ds, data, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="e2e", images=str(ds.covers), encoder=TINY_VIT, tune_blocks=SPLIT,
                                      head="token_relu_mean"), model=seq_config())
    tower = build_image_tower(cfg, data)
    assert isinstance(tower, E2ETower) and tower.encoder.pooling == "mean"
    assert tower.head.fc.in_features == 64  # the ViT width: a head over tokens, not the pooled output


@pytest.mark.parametrize("image_size, side", [(None, 32), (48, 48)])
def test_build_image_tower_e2e_reads_covers_at_the_asked_size(ds, data, tmp_path, image_size, side):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="e2e", images=str(ds.covers), encoder=TINY_VIT, image_size=image_size),
                    model=seq_config())
    tower = build_image_tower(cfg, data)
    assert tower.encoder.image_size == side and tower.pixels.shape == (3, side, side)
    assert tower(torch.tensor([1, 2])).shape == (2, cfg.model.dim)  # positions resized: it runs at that size


# =============================================================================================
# hybrid
# =============================================================================================


def test_hybrid_sum_at_init_is_id_plus_image(ds, data):
    ids = IdTower(data.num_items, DIM)
    image = FrozenTower(open_cache(ds.cache()), data, DIM)
    hybrid = HybridTower(ids, image, "sum")
    idx = torch.tensor([1, 2, 50, data.num_items])
    with torch.no_grad():
        assert torch.allclose(hybrid(idx), ids(idx) + image(idx), atol=1e-6)
        assert torch.equal(hybrid(torch.tensor([0]))[0], torch.zeros(DIM))
    assert hybrid.cheap  # frozen image branch: full softmax affordable


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_hybrid_trains_both_branches(ds, data, mode):
    torch.manual_seed(0)
    hybrid = HybridTower(IdTower(data.num_items, DIM), FrozenTower(open_cache(ds.cache()), data, DIM), mode)
    if mode == "concat":
        assert hybrid.proj.in_features == 2 * DIM and hybrid.proj.out_features == DIM
    model = recommender(hybrid, build_sequence_encoder(seq_config(dropout=0.0, attn_dropout=0.0)))
    seq = first_batch(data, size=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    id_before = hybrid.ids.embedding.weight.detach().clone()
    adapter_before = hybrid.image.adapter.net.weight.detach().clone()
    losses = []
    for _ in range(8):
        loss = model.training_loss(seq, None, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert hybrid.ids.embedding.weight.grad.abs().sum() > 0
            assert hybrid.image.adapter.net.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(hybrid.ids.embedding.weight, id_before)
    assert not torch.equal(hybrid.image.adapter.net.weight, adapter_before)


def test_unknown_hybrid_mode_and_head_are_refused(ds, data):
    image = FrozenTower(open_cache(ds.cache()), data, DIM)
    with pytest.raises(PixelrecError, match="hybrid"):
        HybridTower(IdTower(data.num_items, DIM), image, "product")
    with pytest.raises(PixelrecError, match="head"):
        PartialTower(open_cache(ds.cache()), data, DIM, head="cls")


def test_e2e_reads_a_cover_linked_from_outside_its_folder_only_with_follow_symlinks(ds, data, tmp_path):
    """fit's e2e tower treats its covers folder as `encode` does: a symbolic link to a file outside it
    is refused (the item gets zero pixels, logged by name) unless --follow-symlinks."""
    import os
    import shutil
    from pathlib import Path

    covers, outside = tmp_path / "covers", tmp_path / "elsewhere"
    shutil.copytree(ds.covers, covers)
    outside.mkdir()
    linked = sorted(p for p in covers.iterdir() if p.stem == str(data.item_ids[1]))[0]
    shutil.move(linked, outside / linked.name)
    os.symlink(outside / linked.name, covers / linked.name)

    def pixel_source(folder, follow: bool):
        cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                        items=ItemsConfig(kind="e2e", images=str(folder), encoder=TINY_VIT, tune_blocks=SPLIT,
                                          follow_symlinks=follow), model=seq_config())
        cfg.validate()
        return build_image_tower(cfg, data).pixels

    item = torch.tensor([1])
    refused = pixel_source(covers, False)
    assert refused.failed == {linked.stem: "symbolic link to a file outside the covers folder (not followed "
                                           "without --follow-symlinks)"}
    assert float(refused.get(item).abs().sum()) == 0.0  # zero pixels, as for any unreadable cover
    followed = pixel_source(covers, True)
    assert followed.failed == {} and Path(covers / linked.name).is_symlink()
    assert torch.equal(followed.get(item), pixel_source(ds.covers, False).get(item))  # the linked file's pixels
    assert float(followed.get(item).abs().sum()) > 0


def test_follow_symlinks_is_refused_for_towers_without_a_covers_folder(ds, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="id", follow_symlinks=True), model=seq_config())
    with pytest.raises(PixelrecError, match=r"--follow-symlinks is read only by --items e2e .*not by --items id"):
        cfg.validate()
