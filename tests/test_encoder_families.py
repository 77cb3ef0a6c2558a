"""Splitting the towers that are not ViTs (CLIP ResNet, timm Swin, timm ConvNeXt), on tiny configs.

For each family and every valid K: rest(tokens_at_split(x, K), K) == forward(x); the cache keeps
what rebuilds the top part (family, grid, windows, exact weights); `partial` trains exactly the
cached top K blocks and `e2e --tune-blocks K` leaves only those (and the head) trainable, and the two
compute the same item vectors.
"""

from __future__ import annotations

import copy
import json

import h5py
import pytest
import torch

from fixtures_images import DIM, seq_config, ds, data  # noqa: F401 (fixtures)
from pixelrec.data.images import open_image_store
from pixelrec.encode.cache import open_cache
from pixelrec.encode.encoder import EncoderConfig, TopBlocks, build_encoder
from pixelrec.encode.families import StageTop, describe_state_mismatch, family_of_model
from pixelrec.encode.pipeline import EncodeConfig, encode_images
from pixelrec.errors import PixelrecError
from pixelrec.recommend.image_towers import E2ETower, PartialTower
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import build_sequence_encoder

# model, input size, number of blocks, K at each stage start (last stage first)
FAMILIES = {
    "resnet": ("pixelrec-tiny-rn", 64, 4, [1, 2, 3, 4]),
    "swin": ("pixelrec-tiny-swin", 64, 6, [1, 3, 5, 6]),
    "convnext": ("pixelrec-tiny-convnext", 64, 5, [1, 3, 4, 5]),
}
# partial vs e2e item vectors, relative to their norm (float16 tokens): as for the ViT
REL_TOL = 2e-3


@pytest.fixture(scope="module")
def encoders():
    return {(family, pooling): build_encoder(EncoderConfig(model=model, pooling=pooling, image_size=size))
            for family, (model, size, _, _) in FAMILIES.items() for pooling in ("model", "mean")}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pooling", ["model", "mean"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rest_of_tokens_at_split_is_forward_for_every_k(encoders, pixels, family, pooling):
    enc = encoders[family, pooling]
    model, _, n_blocks, stage_starts = FAMILIES[family]
    assert enc.family == family and enc.num_blocks == n_blocks
    assert enc.split.stage_starts() == stage_starts
    with torch.no_grad():
        full = enc(pixels)
        if pooling == "model":  # the tower's own output, attnpool / timm head + proj included
            assert torch.allclose(full, enc.visual(pixels), atol=1e-6)
        for k in range(1, n_blocks + 1):
            tokens = enc.tokens_at_split(pixels, k)
            assert tokens.shape == (3, *enc.token_shape(k))
            assert torch.allclose(enc.forward_from_split(tokens, k), full, atol=1e-5), k
            top = enc.top_blocks(k).eval()
            assert torch.allclose(top(tokens), full, atol=1e-5), k
            assert torch.allclose(top.last_hidden(tokens), enc.last_hidden(pixels), atol=1e-5), k


def test_mean_pooling_per_family(encoders, pixels):
    with torch.no_grad():
        rn = encoders["resnet", "mean"]
        assert torch.allclose(rn(pixels), rn.last_hidden(pixels).mean(dim=1), atol=1e-6)  # no attnpool
        assert rn.dim == rn.width == 8 * 32
        swin = encoders["swin", "mean"]  # timm's pooled features (final norm, average), without open_clip's proj
        trunk = swin.visual.trunk
        assert torch.allclose(swin(pixels), trunk.forward_head(trunk.forward_features(pixels)), atol=1e-6)
        assert swin.dim == 128 and encoders["swin", "model"].dim == 32


def test_stage_top_rebuilds_from_config_grid_and_state(encoders, pixels):
    enc = encoders["swin", "model"]
    top = enc.top_blocks(3).eval()
    attrs = top.extra_attrs
    assert attrs["family"] == "swin" and attrs["grid"] == [4, 4]
    assert json.loads(attrs["windows"]) == [[4, 4, 0, 0], [4, 4, 0, 0], [2, 2, 0, 0]]
    rebuilt = StageTop.from_state(enc.model_config_json, 3, "model", top.state_dict(), attrs).eval()
    tokens = enc.tokens_at_split(pixels, 3)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), top(tokens))
    with pytest.raises(PixelrecError, match=r"grid"):
        StageTop.from_state(enc.model_config_json, 3, "model", top.state_dict(), {**attrs, "grid": [8, 8]})
    with pytest.raises(PixelrecError, match=r"top blocks are of a CLIP ResNet .* Swin"):
        StageTop.from_state(enc.model_config_json, 3, "model", top.state_dict(), {**attrs, "family": "resnet"})
    with pytest.raises(PixelrecError, match="do not fit"):
        StageTop.from_state(enc.model_config_json, 1, "model", top.state_dict(), {})


def test_split_block_beyond_the_blocks_names_the_range(encoders, pixels):
    enc = encoders["resnet", "model"]
    for k in (0, 5):
        with pytest.raises(PixelrecError, match=r"--split-block .*: expected 1\.\.4 for pixelrec-tiny-rn .*"
                                                r"stages start at K = 1 \(layer4\), 2 \(layer3\)"):
            enc.tokens_at_split(pixels, k)
    with pytest.raises(PixelrecError, match=r"--tune-blocks 7: pixelrec-tiny-swin has only 6 blocks"):
        copy.deepcopy(encoders["swin", "model"]).set_trainable_blocks(7)


@pytest.mark.parametrize("family,pooling", [("resnet", "model"), ("swin", "mean"), ("convnext", "model")])
def test_tune_blocks_leaves_only_the_last_k_and_the_used_head_trainable(encoders, family, pooling):
    enc = copy.deepcopy(encoders[family, pooling])
    k = FAMILIES[family][3][1]  # the last two stages
    enc.set_trainable_blocks(k)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    top = {f"visual.{n}" for n, m in enc.visual.named_modules() for u in enc.split.units[enc.split.cut(k):]
           if m is u}
    head = {"resnet": ["visual.attnpool."], "swin": ["visual.trunk.norm."],
            "convnext": ["visual.trunk.head.norm.", "visual.head.proj."]}[family]
    for name in trainable:
        assert any(name.startswith(prefix + ".") for prefix in top) or any(name.startswith(h) for h in head), name
    assert all(any(n.startswith(prefix + ".") for n in trainable) for prefix in top)
    if family == "swin":  # mean pooling: open_clip's projection is unused, so frozen
        assert not any(n.startswith("visual.head.") for n in trainable)
    enc.train()
    below = enc.split.frozen_modules(k)
    assert all(not m.training for part in below for m in part.modules())  # BatchNorm keeps running stats
    assert all(m.training for u in enc.split.units[enc.split.cut(k):] for m in u.modules())
    enc.set_trainable_blocks(0)  # the head alone
    assert all(any(n.startswith(h) for h in head) for n, p in enc.named_parameters() if p.requires_grad)


def test_checkpoint_mismatch_is_named():
    vit = build_encoder(EncoderConfig(model="pixelrec-tiny-vit")).visual.state_dict()
    fewer = {k: v for k, v in vit.items() if not k.startswith("transformer.resblocks.3.")}
    assert describe_state_mismatch(vit, fewer, "M") == "M has 4 blocks in transformer.resblocks, the checkpoint 3"
    wide = dict(vit, class_embedding=torch.zeros(32))
    assert describe_state_mismatch(vit, wide, "M").startswith("width 32 in the checkpoint, 64 in M")
    rn = build_encoder(EncoderConfig(model="pixelrec-tiny-rn")).visual.state_dict()
    assert "holds a CLIP ResNet (ModifiedResNet) tower, M is a ViT" in describe_state_mismatch(vit, rn, "M")
    assert describe_state_mismatch(vit, dict(vit), "M") is None
    assert family_of_model("RN50x16") == "resnet" and family_of_model("swin_base_patch4_window7_224") == "swin"


# ---- partial and e2e on a cache of each family -------------------------------------------------------


def family_cache(ds, family: str, k: int) -> str:
    model, size, _, _ = FAMILIES[family]
    out = ds.root / f"cache_{family}_k{k}.h5"
    if not out.exists():
        encode_images(EncodeConfig(images=str(ds.covers), out=str(out), split_block=k, num_workers=0, device="cpu",
                                   batch_size=64, encoder=EncoderConfig(model=model, image_size=size)))
    return str(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_partial_trains_the_cached_top_blocks_and_matches_e2e(ds, data, family):
    model, size, _, starts = FAMILIES[family]
    k = starts[1]
    cache = open_cache(family_cache(ds, family, k))
    with h5py.File(cache.path, "r") as f:
        assert f["top_blocks"].attrs["family"] == family
    torch.manual_seed(0)
    partial = PartialTower(cache, data, DIM)
    assert isinstance(partial.top, StageTop) and partial.top.k == k
    pixel = E2ETower(build_encoder(EncoderConfig(model=model, image_size=size)), open_image_store(ds.covers), data,
                     DIM, tune_blocks=k)
    pixel.head.load_state_dict(partial.head.state_dict())
    partial.eval(), pixel.eval()
    idx = torch.arange(1, 41)
    with torch.no_grad():
        a, b = partial(idx), pixel(idx)
    assert float((a - b).abs().max() / b.norm(dim=-1).mean()) < REL_TOL
    # one training step: every weight of the cached top blocks and head gets a gradient, nothing else exists
    partial.train()
    rec = Recommender(partial, build_sequence_encoder(seq_config(dropout=0.0, attn_dropout=0.0)), max_len=10,
                      loss=LossConfig(loss="softmax", negatives=0))
    seq = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 6, 7, 8, 9]])
    rec.training_loss(seq, None, torch.Generator().manual_seed(0)).backward()
    # (a random-init ResNet zeroes every bn3 weight, so its residual branches get zero gradients but for bn3)
    grads = {n: p.grad for n, p in partial.top.named_parameters()}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(g.abs().sum() > 0 for n, g in grads.items() if family != "resnet" or "bn3" in n or "attnpool" in n)


def test_a_cache_of_another_family_is_refused_by_name(ds):
    cache = open_cache(family_cache(ds, "resnet", 2))
    with pytest.raises(PixelrecError, match=r"made with model 'pixelrec-tiny-rn' \(a CLIP ResNet .*trained on a "
                                            r"cache with model 'pixelrec-tiny-vit' \(a ViT tower\)"):
        cache.check_identity({"model": "pixelrec-tiny-vit"}, "encoding new covers")
    with pytest.raises(PixelrecError, match=r"top blocks need a ViT tower"):
        TopBlocks.from_state(cache.attrs["model_config"], 2, "model", cache.top_blocks_state())
