"""The PixelRec code's heads for its other encoders, on tiny configs: `--head pooled_relu`
(ReLU(Linear(pooled output)), its head for CLIP ResNets and Swin), `--no-tune-head` (the encoder's
own head kept frozen, as it keeps CLIP ResNets' attnpool), and Swin weights in timm's layout.

As for the ViT heads (tests/test_image_towers.py), `partial` on a cache and `e2e` with the same
weights compute the same item vectors and gradients.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from fixtures_images import DIM, SPLIT, TINY_VIT, seq_config, ds, data, store  # noqa: F401 (fixtures)
from pixelrec.encode import encoder as encoder_module
from pixelrec.encode.cache import open_cache
from pixelrec.encode.encoder import EncoderConfig, build_encoder
from pixelrec.encode.pipeline import EncodeConfig, encode_images
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import iterate_batches, training_windows
from pixelrec.recommend.build import build_optimizer
from pixelrec.recommend.config import FitConfig
from pixelrec.recommend.image_towers import E2ETower, HybridTower, PartialTower, PooledRelu, build_image_tower
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import build_sequence_encoder

TINY_RN, RN_SIZE, RN_K = "pixelrec-tiny-rn", 64, 2  # K = 2: layer3 + layer4 (one Bottleneck each)
TINY_SWIN, SWIN_SIZE = "pixelrec-tiny-swin", 64
# partial vs e2e item vectors, relative to their mean norm (float16 tokens), as in the other tower tests
REL_TOL = 2e-3


@pytest.fixture(scope="module")
def rn_cache(ds) -> str:
    """The covers through the tiny ResNet at 64 px ('model' pooling: attnpool), tokens entering layer3."""
    out = ds.root / "cache_heads_resnet_k2.h5"
    if not out.exists():
        encode_images(EncodeConfig(images=str(ds.covers), out=str(out), split_block=RN_K, num_workers=0,
                                   device="cpu", batch_size=64,
                                   encoder=EncoderConfig(model=TINY_RN, image_size=RN_SIZE)))
    return str(out)


def encoder_of(family: str):
    if family == "resnet":
        return build_encoder(EncoderConfig(model=TINY_RN, image_size=RN_SIZE))
    return build_encoder(EncoderConfig(model=TINY_VIT))


def twin_towers(family, ds, data, store, rn_cache, head="pooled_relu", tune_head=True):
    """A partial tower on the family's cache and an e2e tower tuning the same top blocks, same head weights."""
    cache, k = (rn_cache, RN_K) if family == "resnet" else (str(ds.cache("model")), SPLIT)
    torch.manual_seed(0)
    partial = PartialTower(open_cache(cache), data, DIM, head=head, tune_head=tune_head)
    pixel = E2ETower(encoder_of(family), store, data, DIM, head=head, tune_blocks=k, tune_head=tune_head)
    pixel.head.load_state_dict(partial.head.state_dict())
    return partial, pixel


def encoder_head(tower) -> torch.nn.Module:
    """The image encoder's own head inside a tower: attnpool (ResNet) or ln_post + proj (ViT)."""
    if isinstance(tower, PartialTower):
        return tower.top.tail if hasattr(tower.top, "tail") else tower.top.head
    visual = tower.encoder.visual
    if hasattr(visual, "attnpool"):
        return visual.attnpool
    head = torch.nn.Module()
    head.ln_post, head.proj = visual.ln_post, torch.nn.ParameterList([visual.proj])
    return head


def tuned_blocks(tower) -> list[torch.nn.Module]:
    if isinstance(tower, PartialTower):
        top = tower.top
        return list(top.units if hasattr(top, "units") else top.blocks)
    enc = tower.encoder
    if enc.split is not None:
        return list(enc.split.units[enc.split.cut(RN_K):])
    return list(enc.visual.transformer.resblocks[-SPLIT:])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.norm(dim=-1).mean())


def rel_grad(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a is not None and b is not None
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-8))


def first_batch(data, size: int = 48) -> torch.Tensor:
    windows = training_windows(data, 10, "sliding", 5)
    return next(iter(iterate_batches(windows, size, torch.Generator().manual_seed(0))))[0]


# ---- --head pooled_relu -------------------------------------------------------------------------------


def test_pooled_relu_is_relu_of_a_linear_map_of_the_attnpool_output(data):
    enc = encoder_of("resnet")
    tower = E2ETower(enc, None, data, DIM, head="pooled_relu", tune_blocks=RN_K).eval()
    assert isinstance(tower.head, PooledRelu)
    assert [n for n, _ in tower.head.named_parameters()] == ["fc.weight", "fc.bias"]
    assert tuple(tower.head.fc.weight.shape) == (DIM, enc.dim) == (DIM, 32)  # attnpool's output: embed_dim 32
    pixels = torch.randn(3, 3, RN_SIZE, RN_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.nn.init.normal_(tower.head.fc.bias, std=0.5, generator=torch.Generator().manual_seed(1))
        pooled = enc.visual.attnpool(enc.split.features(pixels))  # the ResNet's own pooled output [3, 32]
        out = tower.from_pixels(pixels)
    w, b = tower.head.fc.weight.tolist(), tower.head.fc.bias.tolist()
    hand = [[max(0.0, sum(w[j][i] * pooled[r, i].item() for i in range(32)) + b[j]) for j in range(DIM)]
            for r in range(3)]
    assert torch.allclose(out, torch.tensor(hand), atol=1e-5)
    assert 0.2 < float((out == 0).float().mean()) < 0.8  # the ReLU cuts about half of the outputs
    assert float(out.max()) > 0.1


@pytest.mark.parametrize("tune_head", [True, False])
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_partial_and_e2e_give_the_same_item_vectors_with_pooled_relu(ds, data, store, rn_cache, family, tune_head):
    partial, pixel = twin_towers(family, ds, data, store, rn_cache, tune_head=tune_head)
    partial.eval(), pixel.eval()
    idx = torch.arange(1, 41)
    with torch.no_grad():
        a, b = partial(idx), pixel(idx)
    assert a.shape == b.shape == (40, DIM)
    assert float((b == 0).float().mean()) > 0.05 and b.norm(dim=-1).min() > 0.01  # ReLU'd, not all zero
    assert rel_diff(a, b) < REL_TOL
    other = E2ETower(build_encoder(EncoderConfig(model=TINY_RN if family == "resnet" else TINY_VIT,
                                                 image_size=RN_SIZE if family == "resnet" else None, seed=1)),
                     store, data, DIM, head="pooled_relu", tune_blocks=1)
    other.head.load_state_dict(partial.head.state_dict())
    with torch.no_grad():  # control: another encoder is far outside the tolerance
        assert rel_diff(a, other.eval()(idx)) > 20 * REL_TOL


# ---- --no-tune-head ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_no_tune_head_keeps_the_encoder_head_frozen_in_partial_and_e2e(ds, data, store, rn_cache, family):
    partial, pixel = twin_towers(family, ds, data, store, rn_cache, tune_head=False)
    torch.manual_seed(3)
    seq_enc = build_sequence_encoder(seq_config(dropout=0.0, attn_dropout=0.0))
    models = [Recommender(t, copy.deepcopy(seq_enc), max_len=10, loss=LossConfig(loss="softmax", negatives=16))
              for t in (partial, pixel)]
    for m in models:
        m.train()  # as in fit (ResNet: BatchNorm of the tuned blocks on batch statistics, in both towers)
    seq = first_batch(data)
    losses = [m.training_loss(seq, None, torch.Generator().manual_seed(7)) for m in models]
    assert losses[0].item() > 0.01 and abs(losses[0].item() - losses[1].item()) < 2.5e-4 * losses[1].item()
    for loss in losses:
        loss.backward()
    for tower, model in zip((partial, pixel), models):
        head = list(encoder_head(tower).parameters())
        assert len(head) >= 2
        assert all(not p.requires_grad and p.grad is None for p in head)  # frozen: no gradient ...
        blocks = [p for block in tuned_blocks(tower) for p in block.parameters()]
        assert blocks and all(p.requires_grad and p.grad is not None for p in blocks)  # ... the blocks get theirs
        assert float(sum(p.grad.abs().sum() for p in blocks)) > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.head.parameters())  # pooled_relu
        head_ids = {id(p) for p in head}
        for groups in ("standard", "pixelrec"):  # ... and is in no optimizer group
            cfg = FitConfig(interactions="i.csv", out="o")
            cfg.train.decay_groups, cfg.train.lr = groups, 1e-3
            in_optimizer = {id(p) for g in build_optimizer(model, cfg).param_groups for p in g["params"]}
            assert not head_ids & in_optimizer, groups
            assert {id(p) for p in blocks} <= in_optimizer, groups
        assert not head_ids & {id(p) for p in tower.encoder_parameters()}
    # partial and e2e still compute the same gradients for the tuned blocks
    for (name, gp), ge in zip([(n, p) for b in tuned_blocks(partial) for n, p in b.named_parameters()],
                              [p for b in tuned_blocks(pixel) for p in b.parameters()]):
        assert rel_grad(gp.grad, ge.grad) < 1e-2, name


def test_tune_head_default_trains_the_encoder_head(ds, data, store, rn_cache):
    partial, pixel = twin_towers("resnet", ds, data, store, rn_cache)
    for tower in (partial, pixel):
        head = list(encoder_head(tower).parameters())
        assert head and all(p.requires_grad for p in head)
        assert {id(p) for p in head} <= {id(p) for p in tower.encoder_parameters()}
    enc = encoder_of("resnet")
    enc.set_trainable_blocks(-1, tune_head=False)  # all blocks, head frozen
    frozen = {n for n, p in enc.visual.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in enc.visual.named_parameters() if n.startswith("attnpool.")} and frozen


def test_fit_config_builds_a_frozen_head_hybrid_over_partial(ds, data, rn_cache, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"))
    cfg.items.kind, cfg.items.image_branch, cfg.items.cache = "hybrid", "partial", rn_cache
    cfg.items.head, cfg.items.tune_head = "pooled_relu", False
    cfg.model.dim = DIM
    cfg.validate()
    tower = build_image_tower(cfg, data)
    assert isinstance(tower, HybridTower) and isinstance(tower.image.head, PooledRelu)
    assert all(not p.requires_grad for p in tower.image.top.tail.parameters())
    assert all(p.requires_grad for u in tower.image.top.units for p in u.parameters())
    cfg.items.image_branch = "frozen"
    with pytest.raises(PixelrecError, match=r"--no-tune-head .*--items hybrid --image-branch frozen has none"):
        cfg.check()


# ---- Swin weights in timm's layout -------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_swin(tmp_path_factory):
    """A tiny timm Swin with a 5-class classifier, its state dict saved as timm saves it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = timm.create_model("pixelrec_tiny_swin", num_classes=5).eval()
    path = tmp_path_factory.mktemp("timm") / "swin.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_timm_layout_swin_state_dict_loads_with_one_log_line(timm_swin, monkeypatch):
    model, path = timm_swin
    state = torch.load(path)
    assert "layers.0.blocks.0.attn.qkv.weight" in state and "head.fc.weight" in state  # timm's layout
    notes: list[str] = []
    monkeypatch.setattr(encoder_module, "log", notes.append)
    enc = build_encoder(EncoderConfig(model=TINY_SWIN, image_size=SWIN_SIZE, pretrained=str(path), pooling="mean"))
    assert len(notes) == 1 and "timm's layout, read as open_clip's" in notes[0]
    assert "head.fc.* dropped" in notes[0] and "head.proj.weight" in notes[0]
    loaded = enc.visual.state_dict()
    for key, value in state.items():
        if not key.startswith("head.fc."):
            assert torch.equal(loaded[f"trunk.{key}"], value), key
    seeded = build_encoder(EncoderConfig(model=TINY_SWIN, image_size=SWIN_SIZE)).visual.state_dict()
    assert torch.equal(loaded["head.proj.weight"], seeded["head.proj.weight"])  # not in timm weights: its own init
    pixels = torch.randn(2, 3, SWIN_SIZE, SWIN_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # mean pooling = timm's pooled features (final norm, average pool) of these weights
        want = model.forward_head(model.forward_features(pixels), pre_logits=True)
        assert torch.allclose(enc(pixels), want, atol=1e-5)
        assert float(want.abs().mean()) > 0.1
        k = 3  # and the split still holds on loaded weights
        assert torch.allclose(enc.top_blocks(k).eval()(enc.tokens_at_split(pixels, k)), want, atol=1e-5)


def test_other_layouts_are_refused_by_name(timm_swin, tmp_path):
    _, path = timm_swin
    state = torch.load(path)

    def refused(bad: dict, match: str):
        p = tmp_path / "bad.pth"
        torch.save(bad, p)
        with pytest.raises(PixelrecError, match=match):
            build_encoder(EncoderConfig(model=TINY_SWIN, image_size=SWIN_SIZE, pretrained=str(p)))

    hf = {"embeddings.patch_embeddings.projection.weight": torch.zeros(16, 3, 4, 4),
          "encoder.layers.0.blocks.0.attention.self.query.weight": torch.zeros(16, 16)}
    refused(hf, r"Hugging Face transformers state dict \(keys like embeddings\.patch_embeddings\.projection\.weight\)")
    fewer = {k: v for k, v in state.items() if not k.startswith("layers.1.blocks.1.")}
    refused(fewer, r"does not fit pixelrec-tiny-swin: pixelrec-tiny-swin has 2 blocks in trunk\.layers\.1\.blocks, "
                   r"the checkpoint 1")
    convnext = timm.create_model("pixelrec_tiny_convnext", num_classes=5).state_dict()
    refused(convnext, r"holds a ConvNeXt \(timm\) tower, pixelrec-tiny-swin is a Swin \(timm\)")
    vit = build_encoder(EncoderConfig(model=TINY_VIT)).visual.state_dict()
    refused(vit, r"holds a ViT tower, pixelrec-tiny-swin is a Swin \(timm\)")
