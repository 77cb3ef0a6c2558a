"""`--items side`: a side network over the cached per-layer states (tiny ViT, cold dataset, CPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fixtures_images import DIM, TINY_VIT, cold_dataset, hidden_cache, image_config, load_pixels, new_covers
from fixtures_runs import invoke, one_error_line
from pixelrec.data.sequences import load_sequences
from pixelrec.encode import EncoderConfig, build_encoder, open_cache
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import iterate_batches, training_windows
from pixelrec.recommend.build import build_optimizer, build_recommender
from pixelrec.recommend.config import ItemsConfig
from pixelrec.recommend.image_towers import FrozenTower
from pixelrec.recommend.side_tower import SideTower
from pixelrec.index.faiss_index import ItemIndex
from pixelrec.runs.new_items import run_item_encoder
from pixelrec.runs.rundir import RunDir


@pytest.fixture(scope="module")
def ds():
    return cold_dataset()


@pytest.fixture(scope="module")
def data(ds):
    return load_sequences(str(ds.interactions))


def side_config(ds, out, **items):
    cfg = image_config(ds, out, "side", epochs=1, cache=hidden_cache(str(ds.root), "cls", "all"), **items)
    cfg.model.dropout = cfg.model.attn_dropout = 0.0
    return cfg.validate()


def first_batch(data) -> torch.Tensor:
    windows = training_windows(data, 10, "sliding", 5)
    return next(iter(iterate_batches(windows, 32, torch.Generator().manual_seed(0))))[0]


@torch.no_grad()
def test_with_side_residual_the_model_equals_frozen_at_step_0(ds, data, tmp_path):
    frozen_cfg = image_config(ds, tmp_path / "f", "frozen", epochs=1, cache=hidden_cache(str(ds.root), "cls", "all"))
    frozen_cfg.model.dropout = frozen_cfg.model.attn_dropout = 0.0
    side_cfg = side_config(ds, tmp_path / "s", side_residual=True)
    torch.manual_seed(3)
    frozen = build_recommender(frozen_cfg.validate(), data).eval()
    torch.manual_seed(3)
    side = build_recommender(side_cfg, data).eval()
    assert isinstance(side.tower, SideTower) and isinstance(frozen.tower, FrozenTower)
    assert torch.equal(side.tower.all_vectors(), frozen.tower.all_vectors())  # the side head starts at zero
    assert side.tower.side(torch.randn(4, 5, 64)).abs().max() == 0
    for name, value in frozen.encoder.state_dict().items():  # the side network drew from its own generator
        assert torch.equal(value, side.encoder.state_dict()[name]), name
    seq = first_batch(data)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(side.training_loss(seq, None, gen()), frozen.training_loss(seq, None, gen()))


def test_only_the_side_network_and_the_frozen_adapter_receive_gradients(ds, data, tmp_path):
    torch.manual_seed(0)
    model = build_recommender(side_config(ds, tmp_path / "s", side_residual=True), data)
    tower = model.tower
    assert not any("visual" in name or "encoder" in name for name, _ in tower.named_modules())  # no image encoder
    optimizer = build_optimizer(model, side_config(ds, tmp_path / "s", side_residual=True))
    for step in range(2):  # step 0: the zero head passes no gradient below it; after one update it does
        optimizer.zero_grad()
        model.training_loss(first_batch(data), None, torch.Generator().manual_seed(1)).backward()
        with_grad = {n for n, p in tower.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if step == 0:
            assert with_grad == {n for n, _ in tower.named_parameters() if n.startswith(("frozen.", "side.out."))}
        optimizer.step()
    assert with_grad == {n for n, _ in tower.named_parameters()}
    assert all(n.startswith(("side.", "frozen.adapter.")) for n in with_grad)
    assert tower.side.gates.grad.abs().min() > 0  # every tap's gate learns
    assert all(not b.requires_grad for b in tower.buffers())  # the cached states and embeddings stay fixed


@torch.no_grad()
def test_side_taps_read_those_taps_of_the_cache(ds, data):
    path = hidden_cache(str(ds.root), "cls+mean", "all")
    with open_cache(path) as cache:
        tower = SideTower(cache, data, DIM, taps="1,4", bottleneck=8)
        full = cache.read_hidden(np.arange(len(cache)))
        assert tower.taps == [1, 4] and tower.side.widths == [128, 128]
        idx = torch.tensor([1, 5, 9])
        rows = tower.rows[idx].numpy()
        assert np.array_equal(tower.read_states(idx).numpy(), full[rows][:, [1, 4]].astype(np.float32))
        lazy = SideTower(cache, data, DIM, taps="1,4", bottleneck=8, in_memory="no")
        assert lazy.states is None and torch.equal(lazy.read_states(idx), tower.read_states(idx))
    with open_cache(hidden_cache(str(ds.root), "cls", "even")) as cache:
        with pytest.raises(PixelrecError, match=r"--side-taps 3: tap 3 is not available; .* holds taps 0,2,4; make a "
                                                r"cache with them: pixelrec encode .* --hidden cls --taps 3"):
            SideTower(cache, data, DIM, taps="3")
        with pytest.raises(PixelrecError, match=r"--side-taps 0,9: tap 9 is out of range for pixelrec-tiny-vit "
                                                r"\(taps 0..4\); .* holds taps 0,2,4, and pixelrec encode .* --taps all"):
            SideTower(cache, data, DIM, taps="0,9")
    with open_cache(ds.cache()) as cache, pytest.raises(PixelrecError, match="does not hold; make a cache with them: "
                                                                             "pixelrec encode .* --hidden cls"):
        SideTower(cache, data, DIM)


def test_fit_side_through_the_cli_then_evaluate_and_add_images(ds, data, tmp_path):
    run = tmp_path / "run"
    cache = hidden_cache(str(ds.root), "cls", "even")
    res = invoke(["fit", "--interactions", ds.interactions, "--out", run, "--items", "side", "--cache", cache,
                  "--side-taps", "all", "--side-dim", "16", "--side-residual", "--dim", DIM, "--max-len", "10",
                  "--layers", "1", "--epochs", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    config = RunDir(run).read_config()["config"]["items"]
    assert [config[k] for k in ("kind", "side_taps", "side_dim", "side_residual")] == ["side", "all", 16, True]
    res = invoke(["evaluate", run, "--json"])
    assert res.exit_code == 0, res.output
    assert '"ndcg@10"' in res.output

    # the run's item function of a cover: taps from the encoder, then the trained side network; for
    # the catalogue's own covers it reproduces the vectors computed from the cache
    enc = run_item_encoder(str(run))
    vocab = RunDir(run).read_data().item_ids
    vectors = ItemIndex.load(RunDir(run).published().index_dir).reconstruct(np.arange(1, 9))
    with torch.no_grad():
        mine = enc(load_pixels(enc, ds.covers, vocab[1:9])).numpy()
    np.testing.assert_allclose(mine, vectors, rtol=1e-4, atol=1e-4)

    covers = tmp_path / "new"
    shutil.copytree(new_covers(), covers)
    res = invoke(["index", run, "--add-images", covers])
    assert res.exit_code == 0, res.output
    assert "added 6 items" in res.output
    index = ItemIndex.load(RunDir(run).published().index_dir)
    n = len(vocab) - 1
    names = sorted(p.stem for p in covers.iterdir())
    with torch.no_grad():
        want = enc(load_pixels(enc, covers, names)).numpy()
    np.testing.assert_allclose(index.reconstruct(np.arange(n + 1, n + 7)), want, rtol=1e-5, atol=1e-5)


def test_hybrid_over_side_trains_and_encodes_new_covers(ds, tmp_path):
    run = tmp_path / "run"
    res = invoke(["fit", "--interactions", ds.interactions, "--out", run, "--items", "hybrid", "--image-branch",
                  "side", "--cache", hidden_cache(str(ds.root), "cls", "even"), "--side-dim", "8", "--dim", DIM,
                  "--max-len", "10", "--layers", "1", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    enc = run_item_encoder(str(run))
    assert enc.hybrid is not None and isinstance(enc.tower, SideTower)
    with torch.no_grad():
        vectors = enc(load_pixels(enc, new_covers(), sorted(p.stem for p in new_covers().iterdir())))
    assert vectors.shape == (6, DIM) and torch.isfinite(vectors).all() and vectors.std(0).mean() > 0


@pytest.mark.parametrize("args, needles", [
    (["--items", "frozen", "--side-dim", "8"], ["--side-dim shapes the side network of --items side", "--items frozen"]),
    (["--items", "partial", "--side-residual"], ["--side-residual shapes the side network"]),
    (["--items", "side"], ["--items side needs --cache"]),
])
def test_side_options_without_a_side_tower_are_refused(ds, tmp_path, args, needles):
    cache = [] if args == ["--items", "side"] else ["--cache", ds.cache()]
    one_error_line(invoke(["fit", "--interactions", ds.interactions, "--out", tmp_path / "r", *args, *cache,
                           "--epochs", "1"]), *needles)
    assert not (tmp_path / "r").exists()


def test_encoder_taps_are_the_cache_s_for_new_covers(ds):
    # the function new covers go through: forward_hidden gives the cache's states for the cache's covers
    encoder = build_encoder(EncoderConfig(model=TINY_VIT))
    with open_cache(hidden_cache(str(ds.root), "cls", "even")) as cache:
        ids, stored = list(cache.item_ids[:8]), cache.read_hidden(np.arange(8))
        pooled = cache.read_embeddings(np.arange(8))
    with torch.no_grad():
        live_pooled, tokens, states = encoder.forward_hidden(load_pixels(encoder, ds.covers, ids), [0, 2, 4], "cls")
    assert tokens is None
    assert np.array_equal(states.half().numpy(), stored)  # the same numbers as the cache, bit for bit
    assert np.array_equal(live_pooled.half().numpy(), pooled.astype(np.float16))
    assert ItemsConfig().side_taps == "all"
