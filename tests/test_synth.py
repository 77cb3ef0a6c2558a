"""Synthetic dataset generator: format, determinism, cold items, long tail, image-driven dynamics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixelrec.data.images import DirImageStore, open_image_store
from pixelrec.data.interactions import load_interactions
from pixelrec.data.synth import SynthConfig, style_of, synthesize
from pixelrec.errors import PixelrecError

SMALL = SynthConfig(users=300, items=120, cold_items=10, styles=6, image_size=32, max_len=20, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return synthesize(out, SMALL)


def sequences(summary) -> pd.DataFrame:
    """Interactions sorted per user by time, with style and position-from-end (0 = test target)."""
    df = load_interactions(summary.interactions).sort_values(["user_id", "timestamp"], kind="stable")
    df["style"] = df["item_id"].map(style_of(summary.out_dir)).astype(np.int64)  # ids are arrow strings
    df["from_end"] = df.groupby("user_id").cumcount(ascending=False)
    return df.reset_index(drop=True)


def pixels(summary, item_id: str) -> np.ndarray:
    with Image.open(summary.covers / f"{item_id}.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        return np.asarray(img, dtype=np.float64)


def test_writes_pixelrec_format(small):
    assert small.interactions.read_text().splitlines()[0] == "item_id,user_id,timestamp"
    df = load_interactions(small.interactions)
    items = pd.read_csv(small.items, dtype={"item_id": str})
    assert list(items.columns) == ["item_id", "style", "title", "tag", "description"]
    assert len(items) == small.n_items == 120 and items["item_id"].is_unique
    assert items["item_id"].str.fullmatch(r"i\d{5}").all()
    assert set(items["style"]) == set(range(6))
    assert items[["title", "tag", "description"]].notna().all().all()
    assert df["user_id"].nunique() == small.n_users == 300 and df["user_id"].str.fullmatch(r"u\d{5}").all()
    assert len(df) == small.n_interactions
    assert set(df["item_id"]) <= set(items["item_id"])
    assert sorted(p.stem for p in small.covers.iterdir()) == sorted(items["item_id"])
    store = DirImageStore(small.covers)
    assert all(store.load(i).size == (32, 32) for i in store.ids())
    manifest = json.loads(small.manifest.read_text())
    assert manifest["complete"] and manifest["config"]["users"] == 300
    assert manifest["cold_items"] == small.cold_item_ids


def test_sequences_are_valid_user_histories(small):
    df = sequences(small)
    lengths = df.groupby("user_id").size()
    assert lengths.min() >= SMALL.min_len and lengths.max() <= SMALL.max_len
    assert (df.groupby("user_id")["timestamp"].diff().dropna() > 0).all()  # strictly increasing
    assert not df.duplicated(["user_id", "item_id"]).any()  # no repeated item within a user


@pytest.mark.smoke
def test_cold_items_are_only_final_targets(small):
    df = sequences(small)
    cold = set(small.cold_item_ids)
    assert len(cold) == small.n_cold == 10
    rows = df[df["item_id"].isin(cold)]
    assert len(rows) >= 10 and (rows["from_end"] == 0).all()
    assert set(rows["item_id"]) == cold  # every cold item is some user's test target
    warm = set(style_of(small.out_dir)) - cold
    assert set(df.loc[df["from_end"] >= 2, "item_id"]) == warm  # every warm item is trained on


def top10_share(summary) -> float:
    counts = load_interactions(summary.interactions)["item_id"].value_counts()
    assert counts.iloc[0] > 5 * counts.median()  # uniform popularity: about 2x
    return counts.iloc[: int(np.ceil(0.1 * summary.n_items))].sum() / counts.sum()


def test_popularity_is_long_tailed(small, tmp_path):
    assert top10_share(small) == pytest.approx(small.top10_share) and small.top10_share > 0.3  # uniform: 0.1
    bigger = synthesize(tmp_path / "big", SynthConfig(users=2000, items=500, cold_items=20, image_size=8))
    assert top10_share(bigger) > 0.4  # the head grows with the catalogue, as with Zipf


def test_next_item_depends_on_what_images_show(small):
    df = sequences(small)
    prev = df.groupby("user_id")["style"].shift()
    has_prev = prev.notna()
    same = (df["style"][has_prev] == prev[has_prev]).mean()
    successor = (df["style"][has_prev] == (prev[has_prev] + 1) % SMALL.styles).mean()
    assert same > 0.45 and successor > 0.2  # chance is 1/6 each
    # cold test targets follow the same dynamics as warm ones
    cold_last = df[df["item_id"].isin(small.cold_item_ids)].index
    cold_prev = df.loc[cold_last - 1, "style"].to_numpy()
    cold_style = df.loc[cold_last, "style"].to_numpy()
    assert np.mean((cold_style == cold_prev) | (cold_style == (cold_prev + 1) % SMALL.styles)) > 0.5


def test_styles_are_visually_distinct_and_items_differ(small):
    styles = style_of(small.out_dir)
    ids = sorted(styles)
    thumbs = np.stack([pixels(small, i).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel() for i in ids])
    labels = np.array([styles[i] for i in ids])
    centroids = np.stack([thumbs[labels == s].mean(axis=0) for s in range(SMALL.styles)])
    nearest = np.argmin(((thumbs[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.95
    same_style = [i for i in ids if styles[i] == 0][:5]
    flat = [pixels(small, i).ravel() for i in same_style]
    assert all(not np.array_equal(a, b) for k, a in enumerate(flat) for b in flat[k + 1:])


def test_same_seed_is_identical_and_other_seed_differs(tmp_path, small):
    again = synthesize(tmp_path / "again", SMALL)
    assert again.interactions.read_bytes() == small.interactions.read_bytes()
    assert again.items.read_bytes() == small.items.read_bytes()
    for item_id in style_of(small.out_dir):
        assert np.array_equal(pixels(again, item_id), pixels(small, item_id))
    other = synthesize(tmp_path / "other", replace(SMALL, seed=4))
    assert other.interactions.read_bytes() != small.interactions.read_bytes()
    assert not np.array_equal(pixels(other, "i00000"), pixels(small, "i00000"))


def style_means(summary) -> np.ndarray:
    styles = style_of(summary.out_dir)
    means = np.zeros((max(styles.values()) + 1, 3))
    for s in range(len(means)):
        means[s] = np.mean([pixels(summary, i).mean(axis=(0, 1)) for i, v in styles.items() if v == s], axis=0)
    return means


def test_style_seed_shares_the_look_across_seeds(tmp_path):
    cfg = replace(SMALL, users=60, cold_items=0, max_len=10)
    a = synthesize(tmp_path / "a", replace(cfg, seed=1, style_seed=7))
    b = synthesize(tmp_path / "b", replace(cfg, seed=2, style_seed=7))
    c = synthesize(tmp_path / "c", replace(cfg, seed=2))
    assert a.interactions.read_bytes() != b.interactions.read_bytes()
    assert np.abs(style_means(a) - style_means(b)).max() < 12
    assert np.abs(style_means(a) - style_means(c)).max(axis=1).min() > 20
    shapes = [json.loads(s.manifest.read_text())["styles"] for s in (a, b)]
    assert shapes[0] == shapes[1]


def test_lmdb_copy_matches_covers(tmp_path):
    summary = synthesize(tmp_path / "d", replace(SMALL, users=40, items=30, cold_items=3, max_len=8, write_lmdb=True))
    store = open_image_store(summary.lmdb)
    assert store.ids() == DirImageStore(summary.covers).ids()
    for item_id in store.ids()[:10]:
        assert np.array_equal(np.asarray(store.load(item_id), dtype=np.float64), pixels(summary, item_id))


def test_more_cold_items_than_users(tmp_path):
    summary = synthesize(tmp_path / "e", SynthConfig(users=8, items=60, cold_items=20, styles=4, image_size=16,
                                                     max_len=10))
    df = sequences(summary)
    assert summary.n_cold == 20
    cold_rows = df[df["item_id"].isin(summary.cold_item_ids)]
    assert len(cold_rows) == 8 and (cold_rows["from_end"] == 0).all()


def test_output_directory_rules(tmp_path):
    cfg = replace(SMALL, users=30, items=40, cold_items=2, max_len=8)
    synthesize(tmp_path / "out", replace(cfg, write_lmdb=True))
    rerun = synthesize(tmp_path / "out", replace(cfg, items=25))  # earlier output is replaced
    assert len(list(rerun.covers.iterdir())) == 25 and rerun.lmdb is None
    assert not (tmp_path / "out" / "covers.lmdb").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PixelrecError, match="thesis.tex"):
        synthesize(tmp_path / "mine", cfg)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "interactions.csv").write_text("item_id,user_id,timestamp\n")  # same name, not ours
    with pytest.raises(PixelrecError, match="not an earlier synth output"):
        synthesize(tmp_path / "real", cfg)
    assert (tmp_path / "real" / "interactions.csv").exists()


@pytest.mark.parametrize("change, message", [
    ({"cold_items": 118}, "--cold-items"),
    ({"items": 5}, "--items"),
    ({"min_len": 2}, "--min-len"),
    ({"p_stay": 0.8, "p_next": 0.5}, "p_stay"),
])
def test_invalid_settings_are_user_errors(tmp_path, change, message):
    with pytest.raises(PixelrecError, match=message):
        synthesize(tmp_path / "x", replace(SMALL, **change))
    assert not (tmp_path / "x").exists()
