"""ImageEncoder / TopBlocks / build_encoder on tiny randomly initialised open_clip towers."""

from __future__ import annotations

import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pixelrec.data.images import ImageLoadError, open_image_store
from pixelrec.encode.encoder import TINY_MODEL, EncoderConfig, ImageEncoder, TopBlocks, build_encoder
from pixelrec.errors import PixelrecError

TINY_RN = "pixelrec-tiny-rn"


@pytest.fixture(scope="module")
def encoders():
    return {pooling: build_encoder(EncoderConfig(model=TINY_MODEL, pooling=pooling)) for pooling in ("model", "mean")}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.smoke
def test_tiny_vit_shape(encoders):
    enc = encoders["model"]
    assert (enc.num_blocks, enc.width, enc.dim, enc.image_size, enc.num_tokens) == (4, 64, 32, 32, 17)
    assert enc.supports_split
    assert encoders["mean"].dim == 64  # mean pooling skips the projection: dim = width
    assert not enc.training


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_forward_from_split_of_tokens_at_split_is_forward(encoders, pixels, pooling):
    enc = encoders[pooling]
    with torch.no_grad():
        full = enc(pixels)
        assert full.shape == (5, enc.dim)
        for k in range(1, enc.num_blocks + 1):
            tokens = enc.tokens_at_split(pixels, k)
            assert tokens.shape == (5, enc.num_tokens, enc.width)
            torch.testing.assert_close(enc.forward_from_split(tokens, k), full, atol=1e-5, rtol=0)
            pooled, tokens2 = enc.forward_split(pixels, k)
            torch.testing.assert_close(pooled, full, atol=1e-5, rtol=0)
            torch.testing.assert_close(tokens2, tokens, atol=0, rtol=0)
        # the split points differ: tokens entering the last block are not those entering the last two
        assert not torch.allclose(enc.tokens_at_split(pixels, 1), enc.tokens_at_split(pixels, 2))


def test_model_pooling_is_open_clip_output(encoders, pixels):
    enc = encoders["model"]
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), enc.visual(pixels), atol=1e-6, rtol=0)


def test_mean_pooling_is_mean_of_last_hidden_without_ln_post(encoders, pixels):
    enc = encoders["mean"]
    with torch.no_grad():
        hidden = enc.last_hidden(pixels)
        assert hidden.shape == (5, 17, 64)
        torch.testing.assert_close(enc(pixels), hidden.mean(dim=1), atol=1e-6, rtol=0)
        assert not torch.allclose(enc(pixels), enc.visual.ln_post(hidden).mean(dim=1), atol=1e-3)


@pytest.mark.parametrize("pooling", ["model", "mean"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_blocks_reproduce_the_encoder(encoders, pixels, pooling, k):
    enc = encoders[pooling]
    with torch.no_grad():
        tokens = enc.tokens_at_split(pixels, k)
        full = enc(pixels)
        top = enc.top_blocks(k).eval()
        assert len(top.blocks) == k and top.k == k
        assert all(p.requires_grad for p in top.parameters())
        torch.testing.assert_close(top(tokens), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(top.last_hidden(tokens), enc.last_hidden(pixels), atol=1e-5, rtol=0)

        state = {key: value.clone() for key, value in top.state_dict().items()}
        rebuilt = TopBlocks.from_state(enc.model_config_json, k, pooling, state).eval()
        assert len(rebuilt.blocks) == k
        assert not any("conv1" in key or "positional" in key for key in rebuilt.state_dict())
        torch.testing.assert_close(rebuilt(tokens), full, atol=1e-5, rtol=0)

        fresh = TopBlocks.from_config(enc.model_config_json, k, pooling).eval()
        assert not torch.allclose(fresh(tokens), full, atol=1e-3)  # weights matter: a fresh init differs


def test_top_blocks_from_state_rejects_wrong_weights(encoders):
    enc = encoders["model"]
    state = enc.top_blocks(2).state_dict()
    with pytest.raises(PixelrecError, match="do not fit"):
        TopBlocks.from_state(enc.model_config_json, 1, "model", state)


def test_split_needs_a_splittable_tower():
    """ViT, CLIP ResNet, Swin and ConvNeXt towers split (tests/test_encoder_families.py); other timm towers not."""
    from dataclasses import asdict

    from open_clip.timm_model import TimmModel
    from open_clip.transform import PreprocessCfg

    assert build_encoder(EncoderConfig(model=TINY_RN)).supports_split
    with torch.random.fork_rng(devices=[]):
        visual = TimmModel("resnet10t", embed_dim=16, image_size=32, pool="avg", proj="linear")
    enc = ImageEncoder(visual, EncoderConfig(model="timm-resnet10t"), {}, asdict(PreprocessCfg(size=(32, 32))))
    assert not enc.supports_split and enc.dim == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert enc(x).shape == (2, 16)
    expected = "--split-block needs a ViT, CLIP ResNet, Swin or ConvNeXt tower; timm-resnet10t is a TimmModel"
    for call in (lambda: enc.tokens_at_split(x, 1), lambda: enc.forward_from_split(x, 1), lambda: enc.top_blocks(1)):
        with pytest.raises(PixelrecError, match=expected):
            call()
    with pytest.raises(PixelrecError, match="last hidden state needs a ViT, CLIP ResNet"):
        enc.last_hidden(x)
    with pytest.raises(PixelrecError, match=r"--pooling mean needs a ViT, CLIP ResNet, Swin or ConvNeXt tower"):
        ImageEncoder(visual, EncoderConfig(model="timm-resnet10t", pooling="mean"), {},
                     asdict(PreprocessCfg(size=(32, 32))))


def test_split_block_out_of_range(encoders, pixels):
    enc = encoders["model"]
    for k in (0, 5):
        with pytest.raises(PixelrecError, match=r"expected 1\.\.4"):
            enc.tokens_at_split(pixels, k)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_encoder(EncoderConfig(model=TINY_MODEL, seed=7))
    assert torch.equal(torch.rand(3), expected)
    b = build_encoder(EncoderConfig(model=TINY_MODEL, seed=7))
    c = build_encoder(EncoderConfig(model=TINY_MODEL, seed=8))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()


def _band_image(width: int = 64, height: int = 32) -> Image.Image:
    """Blue image with a red band over the left eighth."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 2] = 255
    arr[:, : width // 8] = (255, 0, 0)
    return Image.fromarray(arr)


def test_pixelrec_preset_squashes_without_crop_and_normalises_with_half():
    enc = build_encoder(EncoderConfig(model=TINY_MODEL, preset="pixelrec"))
    assert enc.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and enc.preprocess_cfg["std"] == [0.5, 0.5, 0.5]
    assert enc.preprocess_cfg["resize_mode"] == "squash"
    x = enc.preprocess(_band_image())
    assert x.shape == (3, 32, 32)
    # the band covers the left 32/8 = 4 columns after squashing 64 -> 32: red (1, -1, -1) there
    torch.testing.assert_close(x[:, :, :3].amax(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(x[:, :, 6:].amin(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.02, rtol=0)
    gray = enc.preprocess(Image.new("RGB", (50, 20), (128, 128, 128)))
    torch.testing.assert_close(gray, torch.full((3, 32, 32), (128 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0)

    default = build_encoder(EncoderConfig(model=TINY_MODEL))
    y = default.preprocess(_band_image())
    assert y.shape == (3, 32, 32)
    assert (y[0] < 0).all()  # shortest-side resize + centre crop loses the red band


def test_image_size_override():
    enc = build_encoder(EncoderConfig(model=TINY_MODEL, image_size=48, preset="pixelrec"))
    assert enc.image_size == 48 and enc.num_tokens == 37
    assert enc.preprocess(_band_image()).shape == (3, 48, 48)
    assert '"image_size": 48' in enc.model_config_json
    with torch.no_grad():
        assert enc(torch.zeros(2, 3, 48, 48)).shape == (2, 32)


def test_image_size_bounds():
    """Below one patch (or 32 px for a ResNet) the tower cannot run; above 1024 px it exhausts memory."""
    with pytest.raises(PixelrecError,
                       match=rf"^--image-size 3: expected at least 8 pixels \(the patch size of {TINY_MODEL}\)$"):
        build_encoder(EncoderConfig(model=TINY_MODEL, image_size=3))
    with pytest.raises(PixelrecError, match=r"^--image-size 5000: expected at most 1024 pixels"):
        build_encoder(EncoderConfig(model=TINY_MODEL, image_size=5000))
    with pytest.raises(PixelrecError, match=rf"^--image-size 16: expected at least 32 pixels \({TINY_RN} downsamples"):
        build_encoder(EncoderConfig(model=TINY_RN, image_size=16))
    with pytest.raises(PixelrecError, match="expected at least 8 pixels"):
        build_encoder(EncoderConfig(model=TINY_MODEL, image_size=0))
    assert build_encoder(EncoderConfig(model=TINY_MODEL, image_size=8)).num_tokens == 2  # one patch + class token
    assert build_encoder(EncoderConfig(model=TINY_RN, image_size=32)).image_size == 32


@pytest.mark.parametrize("layout", ["encoder", "visual", "clip"])
def test_local_checkpoint_is_loaded(tmp_path, layout):
    source = build_encoder(EncoderConfig(model=TINY_MODEL, seed=3))
    if layout == "encoder":
        state = source.state_dict()
    elif layout == "visual":
        state = source.visual.state_dict()
    else:  # a full open_clip CLIP checkpoint, text tower included
        clip = open_clip.create_model(TINY_MODEL, pretrained_text=False)
        clip.visual.load_state_dict(source.visual.state_dict())
        state = clip.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded = build_encoder(EncoderConfig(model=TINY_MODEL, pretrained=str(path), seed=0))
    assert loaded.weights_sha256() == source.weights_sha256()
    assert loaded.weights_sha256() != build_encoder(EncoderConfig(model=TINY_MODEL, seed=0)).weights_sha256()


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(PixelrecError, match=f"{missing}: checkpoint file not found"):
        build_encoder(EncoderConfig(model=TINY_MODEL, pretrained=str(missing)))
    rn = tmp_path / "rn.pt"
    torch.save(build_encoder(EncoderConfig(model=TINY_RN)).state_dict(), rn)
    with pytest.raises(PixelrecError, match=f"{rn} does not fit {TINY_MODEL}"):
        build_encoder(EncoderConfig(model=TINY_MODEL, pretrained=str(rn)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PixelrecError, match="cannot read checkpoint"):
        build_encoder(EncoderConfig(model=TINY_MODEL, pretrained=str(junk)))
    with pytest.raises(PixelrecError, match="not a checkpoint file nor an open_clip tag"):
        build_encoder(EncoderConfig(model=TINY_MODEL, pretrained="laion9000"))


def test_unknown_model_lists_valid_names():
    with pytest.raises(PixelrecError, match=rf"unknown model 'ViT-B-33'; valid names include .*ViT-B-32.*{TINY_MODEL}"):
        build_encoder(EncoderConfig(model="ViT-B-33"))
    with pytest.raises(PixelrecError, match="--pooling"):
        build_encoder(EncoderConfig(model=TINY_MODEL, pooling="max"))
    with pytest.raises(PixelrecError, match="--preset"):
        build_encoder(EncoderConfig(model=TINY_MODEL, preset="imagenet"))


def test_set_trainable_blocks():
    enc = build_encoder(EncoderConfig(model=TINY_MODEL))
    enc.set_trainable_blocks(1)
    trainable = {name for name, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith(("visual.transformer.resblocks.3.", "visual.ln_post.")) or name == "visual.proj"
        for name in trainable
    )
    assert "visual.proj" in trainable and "visual.transformer.resblocks.3.attn.in_proj_weight" in trainable
    enc.set_trainable_blocks(0)
    assert {name for name, p in enc.named_parameters() if p.requires_grad} == {
        "visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"
    }
    enc.set_trainable_blocks(None)
    assert all(p.requires_grad for p in enc.parameters())
    with pytest.raises(PixelrecError, match="only 4 blocks"):
        enc.set_trainable_blocks(5)

    mean = build_encoder(EncoderConfig(model=TINY_MODEL, pooling="mean"))
    mean.set_trainable_blocks(-1)
    frozen = {name for name, p in mean.named_parameters() if not p.requires_grad}
    assert frozen == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}  # unused by mean pooling
    with pytest.raises(PixelrecError, match="--tune-blocks 5: pixelrec-tiny-rn has only 4 blocks"):
        build_encoder(EncoderConfig(model=TINY_RN)).set_trainable_blocks(5)


def test_grad_checkpointing_gives_the_same_gradients(pixels):
    grads = []
    for enable in (False, True):
        enc = build_encoder(EncoderConfig(model=TINY_MODEL)).train()
        enc.set_grad_checkpointing(enable)
        enc(pixels).square().sum().backward()
        grads.append(enc.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_pixel_loader_pickles_for_workers(tmp_path):
    enc = build_encoder(EncoderConfig(model=TINY_MODEL, preset="pixelrec"))
    _band_image(640, 320).save(tmp_path / "a1.jpg", quality=95)
    loader = pickle.loads(pickle.dumps(enc.pixel_loader(open_image_store(tmp_path))))
    x = loader("a1")
    assert x.shape == (3, 32, 32)
    assert x[0, :, :3].mean() > 0.9 and x[2, :, :3].mean() < -0.9  # red band kept (JPEG draft decoding)
    with pytest.raises(ImageLoadError, match="missing"):
        loader("zz")
