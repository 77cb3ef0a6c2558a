"""Cold start with the hybrid item tower: ID dropout, the interaction-count gate and the image -> id
map, and one rule for items without an id (cold vocabulary items, items added after training).

Everything runs on the tiny cold dataset of `fixtures_images` (120 items, 10 of them cold) with the
tiny random-init ViT's cache; values are real, nothing is timed.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fixtures_images import ds, data  # noqa: F401 (fixtures)
from fixtures_images import (
    DIM,
    cold_dataset,
    copy_run,
    image_config,
    image_root,
    load_pixels,
    new_covers,
    seq_config,
    stored_item_vectors,
)
from pixelrec.encode.cache import open_cache
from pixelrec.errors import PixelrecError
from pixelrec.index.faiss_index import ItemIndex
from pixelrec.recommend.batches import iterate_batches, training_windows
from pixelrec.recommend.build import build_recommender
from pixelrec.recommend.config import FitConfig, ItemsConfig
from pixelrec.recommend.image_towers import CountGate, FrozenTower, HybridTower, PartialTower, build_image_tower
from pixelrec.recommend.model import LossConfig, Recommender
from pixelrec.recommend.sequence import build_sequence_encoder
from pixelrec.recommend.towers import IdTower
from pixelrec.runs.fit import fit
from pixelrec.runs.item_index import add_images_to_run
from pixelrec.runs.new_items import run_item_encoder
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.rundir import RunDir

RECIPES = {  # name -> HybridTower keyword arguments
    "plain": {},
    "dropout": {"id_dropout": 0.5},
    "gate": {"gate": "count"},
    "map": {"image_to_id": 1.0},
    "all": {"id_dropout": 0.5, "gate": "count", "image_to_id": 1.0},
}


def hybrid(ds, data, mode: str = "sum", branch: str = "frozen", seed: int = 0, **kw) -> HybridTower:
    torch.manual_seed(seed)
    cache = open_cache(ds.cache())
    image = FrozenTower(cache, data, DIM, "mlp") if branch == "frozen" else PartialTower(cache, data, DIM)
    return HybridTower(IdTower(data.num_items, DIM), image, mode, counts=torch.from_numpy(data.train_counts), **kw)


def scramble(tower: HybridTower, seed: int = 1) -> HybridTower:
    """Give every parameter a random non-trivial value (a trained-looking tower: gate not at its init,
    id map not zero), so that equalities below do not hold by accident of the initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tower


def known_items(data) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(data.train_counts > 0))


def cold_items(data) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(data.train_counts[1:] == 0) + 1)


def record_calls(module, name: str) -> list[torch.Tensor]:
    calls: list[torch.Tensor] = []
    original = getattr(module, name)

    def wrapped(idx, *a, **kw):
        calls.append(idx.clone())
        return original(idx, *a, **kw)

    setattr(module, name, wrapped)
    return calls


# =============================================================================================
# ID dropout
# =============================================================================================


def test_id_dropout_drops_each_warm_items_id_with_probability_p(ds, data):
    tower = hybrid(ds, data, id_dropout=0.3).train()
    calls = record_calls(tower.ids, "encode")
    warm = known_items(data)
    cold = cold_items(data)
    everything = torch.arange(1, data.num_items + 1)
    torch.manual_seed(0)
    steps = 60
    for _ in range(steps):
        tower(everything)
    assert len(calls) == steps  # the id tower runs once per call, on the kept items only
    kept = torch.cat(calls)
    assert not set(kept.tolist()) & set(cold.tolist())  # a cold item never has an id to keep
    assert set(kept.tolist()) <= set(warm.tolist())
    share = len(kept) / (steps * len(warm))
    assert abs(share - 0.7) < 0.03, share  # 6,600 draws: sd 0.006
    per_item = torch.bincount(kept, minlength=data.num_items + 1)[warm].float() / steps
    assert 0.4 < per_item.min() and per_item.max() < 0.95  # every warm item is dropped, and kept, sometimes
    # serving (eval mode) drops nothing: every warm item uses its id
    calls.clear()
    tower.eval()
    with torch.no_grad():
        tower(everything)
    assert len(calls) == 1 and calls[0].tolist() == warm.tolist()


def test_a_dropped_item_gets_no_id_gradient_and_the_cold_vector(ds, data):
    tower = scramble(hybrid(ds, data, id_dropout=0.5, gate="count", image_to_id=1.0)).train()
    calls = record_calls(tower.ids, "encode")
    warm = known_items(data)
    torch.manual_seed(3)
    vecs = tower(warm)
    kept = set(calls[0].tolist())
    dropped = torch.tensor([i for i in warm.tolist() if i not in kept])
    assert 0.3 * len(warm) < len(dropped) < 0.7 * len(warm)
    (vecs * torch.randn(vecs.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grad = tower.ids.embedding.weight.grad
    assert torch.equal(grad[dropped], torch.zeros(len(dropped), DIM))  # exactly zero: the id was never read
    kept_idx = torch.tensor(sorted(kept))
    assert (grad[kept_idx].abs().sum(dim=1) > 0).all()
    # the image side trains for dropped and kept items alike
    assert tower.image.adapter.net[0].weight.grad.abs().sum() > 0
    # a dropped item's vector is the cold path of its image part (what a cold item gets when served)
    with torch.no_grad():
        position = {int(i): j for j, i in enumerate(warm.tolist())}
        rows = torch.tensor([position[int(i)] for i in dropped])
        want = tower.cold_from_image(tower.image(dropped))
    assert torch.allclose(vecs.detach()[rows], want, atol=1e-6)
    tower.auxiliary_loss()  # (reset what the training call collected)


# =============================================================================================
# cold items when served: the image path under each recipe
# =============================================================================================


@pytest.mark.parametrize("recipe, mode", [(r, m) for m in ("sum", "concat", "switch") for r in RECIPES
                                          if not (m == "switch" and "gate" in RECIPES[r])])  # switch takes no gate
def test_a_cold_items_served_vector_is_the_image_path(ds, data, recipe, mode):
    tower = scramble(hybrid(ds, data, mode, **RECIPES[recipe])).eval()
    cold = cold_items(data)
    assert len(cold) == 10
    with torch.no_grad():
        served = tower(cold)
        table = tower.all_vectors()  # what the index holds
        image = tower.image(cold)
        want = tower.cold_from_image(image)
    assert torch.allclose(served, want, atol=1e-6) and torch.allclose(table[cold], want, atol=1e-6)
    if recipe in ("plain", "dropout") and mode in ("sum", "switch"):
        assert torch.allclose(served, image, atol=1e-6)  # no id map: the image part alone
    if mode == "switch" and tower.to_id is not None:
        assert torch.allclose(served, tower.to_id(image), atol=1e-6)  # the predicted id
    if recipe in ("gate", "all") and mode == "sum":
        g0 = torch.sigmoid(tower.gate.bias)
        predicted = tower.to_id(image) if tower.to_id is not None else torch.zeros_like(image)
        assert torch.allclose(served, g0 * predicted + (1 - g0) * image, atol=1e-6)
    # ... and a warm item's vector is not: it uses its id
    warm = known_items(data)[:10]
    with torch.no_grad():
        assert not torch.allclose(tower(warm), tower.cold_from_image(tower.image(warm)), atol=1e-3)


@pytest.mark.parametrize("recipe", ["plain", "dropout", "map"])
def test_switch_gives_warm_items_their_id_embedding_alone(ds, data, recipe):
    tower = scramble(hybrid(ds, data, "switch", **RECIPES[recipe])).eval()
    warm = known_items(data)
    with torch.no_grad():
        assert torch.equal(tower(warm), tower.ids(warm))  # warm items: IDNet exactly


def test_switch_refuses_a_gate(ds, data):
    with pytest.raises(PixelrecError, match="--hybrid switch"):
        hybrid(ds, data, "switch", gate="count")


# =============================================================================================
# the count gate
# =============================================================================================


def test_the_count_gate_is_monotone_in_the_interaction_count():
    torch.manual_seed(0)
    gate = CountGate(16)
    with torch.no_grad():
        gate.slope.copy_(torch.randn(16) * 3)  # any raw slope, negative ones included
        gate.bias.copy_(torch.randn(16) * 3)
    counts = torch.tensor([0, 1, 2, 3, 5, 8, 20, 100, 1000, 10**6])
    with torch.no_grad():
        g = gate(counts)
    assert g.shape == (len(counts), 16) and ((g >= 0) & (g <= 1)).all()
    assert (g[1:] >= g[:-1]).all()
    assert torch.allclose(g[0], torch.sigmoid(gate.bias))  # a cold item (count 0): sigmoid(bias)


def test_the_gated_hybrid_leans_on_the_id_as_the_count_grows(ds, data):
    """Constructed case: every item has the same id vector u and the same image vector w; items
    differ only in their training-interaction count. The vector moves from w (image) towards u (id)
    as the count grows, monotonically, for any gate parameters."""
    tower = scramble(hybrid(ds, data, gate="count"), seed=4).eval()
    u, w = torch.randn(DIM, generator=torch.Generator().manual_seed(1)), torch.zeros(DIM)
    with torch.no_grad():
        tower.ids.embedding.weight[1:] = u
        for p in tower.image.adapter.parameters():
            p.zero_()
        tower.image.adapter.net[-1].bias.copy_(w + 1.0)  # image part = w + 1 for every item
        counts = torch.tensor([0, 1, 2, 4, 8, 16, 32, 64, 128, 512], dtype=torch.float32)
        tower.counts[1 : len(counts) + 1] = counts
        tower.known[1 : len(counts) + 1] = counts > 0
        vecs = tower(torch.arange(1, len(counts) + 1))
    toward_id = (vecs - (w + 1)) @ (u - (w + 1)) / (u - (w + 1)).square().sum()  # 0 = image, 1 = id
    assert (toward_id[1:] - toward_id[:-1] >= -1e-6).all(), toward_id
    assert toward_id[-1] > toward_id[0] + 0.05
    assert ((toward_id >= -1e-6) & (toward_id <= 1 + 1e-6)).all()


# =============================================================================================
# image -> id map (auxiliary loss)
# =============================================================================================


def test_the_image_to_id_loss_trains_a_map_to_the_id_embeddings(ds, data):
    tower = hybrid(ds, data, image_to_id=2.0).train()
    assert tower.auxiliary_loss() is None  # nothing collected yet
    warm = known_items(data)
    with torch.no_grad():  # "trained" ids that a linear map of the image part can predict
        mix = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(2)) / DIM**0.5
        tower.ids.embedding.weight[warm] = tower.image(warm) @ mix
    ids_before = tower.ids.embedding.weight.detach().clone()
    opt = torch.optim.Adam([p for n, p in tower.named_parameters() if not n.startswith("ids.")], lr=1e-2)
    losses = []
    for _ in range(150):
        tower(warm)
        loss = tower.auxiliary_loss()
        assert tower.auxiliary_loss() is None  # reset by the call
        opt.zero_grad()
        loss.backward()
        assert tower.ids.embedding.weight.grad is None  # the target is detached: ids are not pulled
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2.0, rel=1e-5)  # to_id starts at zero: relative error 1, times lambda
    assert losses[-1] < 0.05 * losses[0]
    assert torch.equal(tower.ids.embedding.weight, ids_before)
    # a cold item's vector uses the predicted id: plain sum of predicted id and image part
    tower.eval()
    cold = cold_items(data)
    with torch.no_grad():
        image = tower.image(cold)
        assert torch.allclose(tower(cold), tower.to_id(image) + image, atol=1e-6)
        tower(warm)
    assert tower.auxiliary_loss() is None  # serving collects nothing


def test_the_recipes_join_the_recommendation_loss(ds, data):
    """One training step of a Recommender over the full hybrid: finite loss including the auxiliary
    term, gradients reach the gate and the id map."""
    tower = hybrid(ds, data, **RECIPES["all"])
    model = Recommender(tower, build_sequence_encoder(seq_config()), max_len=10, loss=LossConfig())
    windows = training_windows(data, 10, "sliding", 5)
    seq = next(iter(iterate_batches(windows, 32, torch.Generator().manual_seed(0))))[0]
    model.train()
    torch.manual_seed(0)
    rec = model.recommendation_loss(seq)
    aux = tower.auxiliary_loss()
    assert aux is not None and aux.item() == pytest.approx(1.0, rel=1e-5)
    torch.manual_seed(0)
    total = model.training_loss(seq)
    assert total.item() == pytest.approx(rec.item() + aux.item(), rel=1e-5)
    total.backward()
    assert tower.gate.slope.grad.abs().sum() > 0 and tower.to_id.weight.grad.abs().sum() > 0


# =============================================================================================
# configuration
# =============================================================================================


def test_the_fit_options_build_the_recipes(ds, data, tmp_path):
    cfg = FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"),
                    items=ItemsConfig(kind="hybrid", cache=str(ds.cache()), id_dropout=0.25, hybrid_gate="count",
                                      image_to_id=0.5), model=seq_config())
    tower = build_image_tower(cfg.validate(), data)
    assert isinstance(tower, HybridTower)
    assert tower.id_dropout == 0.25 and isinstance(tower.gate, CountGate) and tower.image_to_id == 0.5
    assert torch.equal(tower.counts, torch.from_numpy(data.train_counts).float())
    off = build_image_tower(FitConfig(interactions=str(ds.interactions), out=str(tmp_path / "r"), model=seq_config(),
                                      items=ItemsConfig(kind="hybrid", cache=str(ds.cache()), id_dropout=0.0,
                                                        hybrid_gate="none", image_to_id=0.0)), data)
    assert off.id_dropout == 0 and off.gate is None and off.to_id is None
    assert {n for n, _ in off.named_parameters()} == {n for n, _ in off.named_parameters()
                                                      if n.startswith(("ids.", "image."))}


@pytest.mark.parametrize("kw, message", [({"id_dropout": 1.0}, "--id-dropout"), ({"gate": "sigmoid"}, "--hybrid-gate"),
                                         ({"image_to_id": -1.0}, "--image-to-id")])
def test_bad_recipe_values_are_refused(ds, data, kw, message):
    with pytest.raises(PixelrecError, match=message):
        hybrid(ds, data, **kw)


# =============================================================================================
# a trained hybrid run: cold vocabulary items and new items take the same path
# =============================================================================================


def hybrid_run():
    out = image_root() / "runs" / "cold_hybrid_recipes"
    if not (out / "manifest.json").is_file():
        fit(image_config(cold_dataset(), out, "hybrid", epochs=2, id_dropout=0.5, hybrid_gate="count",
                         image_to_id=1.0))
    return out


@torch.no_grad()
def image_path(run, covers, names) -> np.ndarray:
    """Independently of RunItemEncoder: cover -> the cache's encoder -> the run's adapter -> the
    hybrid's cold path, with the run's own weights."""
    cfg = RunDir(run).fit_config()
    model = build_recommender(cfg, RunDir(run).read_data())
    published = RunDir(run).published()
    model.load_state_dict(RunDir(run).load_checkpoint(published.checkpoint, "cpu")["model"])
    model.eval()
    from pixelrec.encode.encoder import EncoderConfig, build_encoder

    base = build_encoder(EncoderConfig(model="pixelrec-tiny-vit", seed=0)).eval()
    emb = base(load_pixels(base, covers, names)).to(torch.float16).float()  # as the float16 cache holds it
    return model.tower.cold_from_image(model.tower.image.adapter(emb)).numpy()


def test_a_new_item_of_a_hybrid_run_gets_the_image_path_and_is_retrievable(tmp_path):
    ds = cold_dataset()
    run = copy_run(hybrid_run(), tmp_path / "run")
    data = RunDir(run).read_data()
    n = data.num_items
    vectors, _ = stored_item_vectors(run)
    # the run's cold vocabulary items hold exactly the image path of their covers ...
    cold = np.flatnonzero(data.train_counts[1:] == 0) + 1
    names = [str(data.item_ids[i]) for i in cold]
    assert np.abs(vectors[cold - 1] - image_path(run, ds.covers, names)).max() < 1e-4
    # ... and so do items added after training
    summary = add_images_to_run(str(run), str(new_covers()), workers=0)
    assert summary.added == 6 and (summary.first_id, summary.last_id) == (n + 1, n + 6)
    new = sorted(p.stem for p in new_covers().iterdir())
    index = ItemIndex.load(RunDir(run).published().index_dir)
    added = index.reconstruct(np.arange(n + 1, n + 7))
    want = image_path(run, new_covers(), new)
    assert np.abs(added - want).max() < 1e-4
    assert np.abs(added).max() > 1e-3  # not trivially zero
    # the same rule as `encode --from-run` (RunItemEncoder)
    enc = run_item_encoder(str(run))
    with torch.no_grad():
        mine = enc(load_pixels(enc, new_covers(), new)).numpy()
    assert np.abs(mine - want).max() < 1e-4
    # retrievable: a search over the whole index finds every new item with its own vector's score, and a
    # user who watched one of them is recommended from a catalogue that holds them all
    scores, found = index.search(added, n + 6)
    for j in range(6):
        hit = np.flatnonzero(found[j] == n + 1 + j)
        assert len(hit) == 1 and scores[j, hit[0]] == pytest.approx(float(added[j] @ added[j]), rel=1e-4)
    everything = retrieve_one(str(run), history=[new[0]], k=n + 5)
    assert set(new[1:]) <= set(everything.items)


def test_a_hybrid_run_without_recipes_keeps_the_image_part_alone_for_new_items(tmp_path):
    out = tmp_path / "plain"
    fit(image_config(cold_dataset(), out, "hybrid", epochs=1, id_dropout=0.0, hybrid_gate="none", image_to_id=0.0))
    new = sorted(p.stem for p in new_covers().iterdir())
    enc = run_item_encoder(str(out))
    with torch.no_grad():
        pixels = load_pixels(enc, new_covers(), new)
        assert torch.equal(enc(pixels), enc.image_part(pixels))
    shutil.rmtree(out)
