"""`encode --hidden`: the per-layer states of the same forward pass, stored with the cache's checksums,
resume and sharding (tiny ViT / ResNet / Swin, 32-64 px covers, CPU)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from fixtures_images import TINY_VIT, cold_dataset, hidden_cache, load_pixels
from fixtures_runs import invoke, one_error_line, same_cache, synth_dataset
from pixelrec.encode import cache as cache_module
from pixelrec.encode import EncodeConfig, EncoderConfig, build_encoder, encode_images, open_cache, verify_cache
from pixelrec.encode.encoder import pool_and_project
from pixelrec.errors import PixelrecError

FP16 = dict(rtol=2e-3, atol=2e-3)  # the states are stored in float16


@pytest.fixture(scope="module")
def ds():
    return cold_dataset()


def live_states(encoder, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering block 1 and leaving every block: [B, T, W] each, computed here."""
    visual = encoder.visual
    x = visual._embeds(pixels)
    states = [x]
    for block in visual.transformer.resblocks:
        x = block(x)
        states.append(x)
    return states


@torch.no_grad()
def test_cached_taps_equal_a_live_forward(ds):
    path = hidden_cache(str(ds.root), "cls+mean", "all")
    with open_cache(path) as cache:
        assert (cache.hidden_kind, cache.hidden_taps) == ("cls+mean", [0, 1, 2, 3, 4])  # 4 blocks: 5 taps
        assert cache.hidden_shape == (5, 128) and cache.hidden_widths == [128] * 5  # [cls (64), mean of patches (64)]
        ids = list(cache.item_ids[:16])
        stored = cache.read_hidden(np.arange(16)).astype(np.float32)
    encoder = build_encoder(EncoderConfig(model=TINY_VIT))
    states = live_states(encoder, load_pixels(encoder, ds.covers, ids))
    for t, x in enumerate(states):
        np.testing.assert_allclose(stored[:, t, :64], x[:, 0].numpy(), **FP16)
        np.testing.assert_allclose(stored[:, t, 64:], x[:, 1:].mean(dim=1).numpy(), **FP16)


@torch.no_grad()
def test_the_same_pass_keeps_embeddings_and_tokens_and_the_last_tap_gives_the_pooled_embedding(ds):
    plain, path = ds.cache(), hidden_cache(str(ds.root), "cls", "all")
    with open_cache(plain) as a, open_cache(path) as b:
        rows = np.arange(len(a))
        assert np.array_equal(a.read_embeddings(rows), b.read_embeddings(rows))  # bit for bit
        assert np.array_equal(a.read_tokens(rows), b.read_tokens(rows))
        last = torch.from_numpy(b.read_hidden(rows)[:, -1].astype(np.float32))  # [N, W], after the last block
        pooled = b.read_embeddings(rows)
    encoder = build_encoder(EncoderConfig(model=TINY_VIT))
    through_head = pool_and_project(encoder.visual, last[:, None, :]).numpy()  # ln_post + proj of the class token
    cos = (through_head * pooled).sum(1) / np.linalg.norm(through_head, axis=1) / np.linalg.norm(pooled, axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(through_head, pooled, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_even_taps_and_a_resnet_s_stage_taps(tmp_path, ds):
    with open_cache(hidden_cache(str(ds.root), "cls", "even")) as cache:
        assert cache.hidden_taps == [0, 2, 4] and cache.hidden_shape == (3, 64)
        assert json.loads(cache.attrs["hidden_taps"]) == [0, 2, 4] and cache.attrs["hidden_tap_range"] == 5

    covers = synth_dataset().covers  # 32 px
    out = tmp_path / "rn.h5"
    encode_images(EncodeConfig(images=str(covers), out=str(out), num_workers=0, device="cpu", hidden="cls",
                               encoder=EncoderConfig(model="pixelrec-tiny-rn", pooling="mean")))
    with open_cache(out) as cache:
        widths, (n_taps, width) = cache.hidden_widths, cache.hidden_shape
        assert cache.hidden_taps == [0, 1, 2, 3, 4] and n_taps == 5 and width == max(widths) == widths[-1]
        states = cache.read_hidden(np.arange(len(cache))).astype(np.float32)
        pooled = cache.read_embeddings(np.arange(len(cache)))
    assert widths == sorted(widths) and widths[0] < widths[-1]  # stem, then ever wider stages
    for t, w in enumerate(widths):
        assert not states[:, t, w:].any()  # narrower stages padded with zeros
    # mean pooling of a ResNet is the mean over positions of the last stage: the last tap
    np.testing.assert_allclose(states[:, -1], pooled, **FP16)
    assert verify_cache(out).ok


def test_resume_of_an_interrupted_hidden_encode_equals_an_uninterrupted_one(tmp_path, monkeypatch, ds):
    cfg = dict(images=str(ds.covers), encoder=EncoderConfig(model=TINY_VIT), split_block=2, batch_size=16,
               num_workers=0, device="cpu", hidden="cls+mean", taps="even")
    straight = tmp_path / "straight.h5"
    encode_images(EncodeConfig(out=str(straight), **cfg))

    append, calls = cache_module.CacheWriter.append, []

    def failing_append(self, *args, **kwargs):
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        append(self, *args, **kwargs)
        calls.append(1)

    resumed = tmp_path / "resumed.h5"
    monkeypatch.setattr(cache_module.CacheWriter, "append", failing_append)
    with pytest.raises(OSError):
        encode_images(EncodeConfig(out=str(resumed), **cfg))
    monkeypatch.setattr(cache_module.CacheWriter, "append", append)
    with h5py.File(f"{resumed}.partial", "r") as f:
        assert f["hidden"].shape[0] == f.attrs["n_rows"] == 48  # 3 blocks of 16 committed
    summary = encode_images(EncodeConfig(out=str(resumed), **cfg))
    assert summary.resumed_from == 48
    same_cache(straight, resumed)

    # another tap list is another cache: refused by name, not mixed into this one
    with pytest.raises(PixelrecError, match=r"taps \[0, 2, 4\], this run asks for taps \[0, 1, 2, 3, 4\]"):
        encode_images(EncodeConfig(out=str(resumed), **{**cfg, "taps": "all"}))


def test_a_damaged_state_fails_its_block_checksum(tmp_path, ds):
    path = tmp_path / "c.h5"
    path.write_bytes(hidden_cache(str(ds.root), "cls", "even").read_bytes())
    with h5py.File(path, "r+") as f:
        f["hidden"][5, 1, 3] = f["hidden"][5, 1, 3] + 1
    report = verify_cache(path)
    assert not report.ok and report.first_bad_rows == (0, 64) and "does not match its checksum" in report.problems[0]


@pytest.mark.parametrize("extra, needles", [
    (["--hidden", "cls", "--taps", "9"], ["--taps 9: tap 9 is not available", "taps 0..4"]),
    (["--taps", "even"], ["--taps even chooses the layers of --hidden"]),
    (["--hidden", "cls", "--taps", "1,x"], ["--taps 1,x: expected all, even or tap numbers"]),
    (["--hidden", "cls+mean", "--encoder", "pixelrec-tiny-rn"], ["--hidden cls+mean reads a class token"]),
])
def test_bad_tap_settings_are_refused_in_one_line(tmp_path, extra, needles):
    args = ["encode", "--images", synth_dataset().covers, "--out", tmp_path / "c.h5", "--workers", "0",
            "--device", "cpu", "--encoder", TINY_VIT]
    one_error_line(invoke(args + extra), *needles)
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
def test_two_rank_hidden_encode_equals_one_process(tmp_path, ds):
    from test_distributed import _encode_args, torchrun

    one = tmp_path / "one.h5"
    encode_images(EncodeConfig(images=str(ds.covers), out=str(one), encoder=EncoderConfig(model=TINY_VIT),
                               split_block=2, batch_size=8, num_workers=0, device="cpu", hidden="cls+mean",
                               taps="even"))
    two = tmp_path / "two.h5"
    r = torchrun(_encode_args(ds.covers, two, "--hidden", "cls+mean", "--taps", "even"))
    assert r.returncode == 0, r.stderr
    same_cache(one, two)
    with open_cache(two) as cache:
        assert cache.hidden_taps == [0, 2, 4]
