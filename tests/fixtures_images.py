"""Shared tiny image datasets, encoded caches and trained image runs (image towers, transfer, new items).

Each is built at most once per test session, on first use, by a cached builder function under
the session's temporary root (removed at exit); see `fixtures_runs` for why these are cached
functions rather than fixtures: here most of them take arguments (`cold_run(kind)`,
`encoded_cache(root, pooling, seed)`) and helpers such as `ImageData.cache()` call them.
Everything uses the tiny randomly initialised ViT (`pixelrec-tiny-vit`: 32 px, 4 blocks, width 64,
seed 0) on 32 px covers, one torch thread, CPU.

Import the helpers (`from fixtures_images import ...`); pytest puts tests/ on sys.path.
Tests that modify a run work on a copy (`copy_run`).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_runs import session_root
from pixelrec.recommend.config import FitConfig, ItemsConfig, TrainConfig
from pixelrec.recommend.sequence import SequenceConfig
from pixelrec.runs.fit import fit

TINY_VIT = "pixelrec-tiny-vit"
SPLIT = 2  # tokens entering the last 2 of the tiny ViT's 4 blocks
DIM = 32  # recommender dimension of every run here
TRANSFER_STYLE_SEED = 7


def image_root() -> Path:
    """This module's part of the session's temporary directory."""
    root = session_root() / "images"
    root.mkdir(exist_ok=True)
    return root


# ---------------------------------------------------------------------------------------- datasets
@dataclass
class ImageData:
    root: Path
    interactions: Path
    covers: Path
    cold_item_ids: list[str]
    n_items: int

    def cache(self, pooling: str = "model", seed: int = 0) -> Path:
        return encoded_cache(str(self.root), pooling, seed)


def _synth(name: str, **kw) -> ImageData:
    from pixelrec.data.synth import SynthConfig, synthesize

    out = image_root() / name
    s = synthesize(out, SynthConfig(image_size=32, max_len=20, **kw))
    return ImageData(out, Path(s.interactions), Path(s.covers), list(s.cold_item_ids), s.n_items)


@functools.lru_cache(maxsize=None)
def cold_dataset() -> ImageData:
    """400 users, 120 items of 8 styles, 10 cold items (only ever final test targets)."""
    return _synth("cold", users=400, items=120, cold_items=10, styles=8, cold_user_frac=0.2, seed=1)


@functools.lru_cache(maxsize=None)
def transfer_datasets() -> tuple[ImageData, ImageData]:
    """Two catalogues that share visual styles (same style_seed) but no items or users.

    Users mostly move to the next style (p_next 0.8), which a model has to learn (an untrained model
    with image features only gets the 'same style again' part), so a transferred model has a head start.
    """
    common = dict(items=120, cold_items=10, styles=6, style_seed=TRANSFER_STYLE_SEED, p_stay=0.1, p_next=0.8)
    a = _synth("transfer_a", users=400, seed=101, item_prefix="a", user_prefix="ua", **common)
    b = _synth("transfer_b", users=300, seed=201, item_prefix="b", user_prefix="ub", **common)
    return a, b


@functools.lru_cache(maxsize=None)
def encoded_cache(root: str, pooling: str = "model", seed: int = 0) -> Path:
    """The dataset's covers through the tiny ViT (random init `seed`), float16, with split-block-2 tokens."""
    from pixelrec.encode.pipeline import EncodeConfig, encode_images
    from pixelrec.encode.encoder import EncoderConfig

    out = Path(root) / f"cache_{pooling}_s{seed}.h5"
    encode_images(EncodeConfig(images=str(Path(root) / "covers"), out=str(out),
                               encoder=EncoderConfig(model=TINY_VIT, pooling=pooling, seed=seed),
                               split_block=SPLIT, num_workers=0, device="cpu", batch_size=64))
    return out


@functools.lru_cache(maxsize=None)
def hidden_cache(root: str, hidden: str = "cls", taps: str = "all") -> Path:
    """`encoded_cache(root)` (same encoder, batches and split-block-2 tokens) with per-layer states."""
    from pixelrec.encode.pipeline import EncodeConfig, encode_images
    from pixelrec.encode.encoder import EncoderConfig

    out = Path(root) / f"cache_hidden_{hidden.replace('+', '_')}_{taps.replace(',', '_')}.h5"
    encode_images(EncodeConfig(images=str(Path(root) / "covers"), out=str(out), encoder=EncoderConfig(model=TINY_VIT),
                               split_block=SPLIT, num_workers=0, device="cpu", batch_size=64, hidden=hidden, taps=taps))
    return out


@functools.lru_cache(maxsize=None)
def new_covers() -> Path:
    """A directory of 6 covers of items no run here knows (ids n00000..n00005), same styles as `cold_dataset`."""
    from pixelrec.data.synth import SynthConfig, synthesize

    src = synthesize(image_root() / "new_src", SynthConfig(users=30, items=24, cold_items=0, styles=8, seed=5,
                                                           image_size=32, max_len=20, item_prefix="n"))
    out = image_root() / "new_covers"
    out.mkdir()
    for name in sorted(p.name for p in Path(src.covers).iterdir())[:6]:
        shutil.copy(Path(src.covers) / name, out / name)
    return out


# ---------------------------------------------------------------------------------------- runs
def seq_config(**kw) -> SequenceConfig:
    base = dict(dim=DIM, max_len=10, layers=1, heads=2, dropout=0.1, attn_dropout=0.1)
    base.update(kw)
    return SequenceConfig(**base)


def image_config(data: ImageData, out: Path, kind: str, *, epochs: int, seed: int = 0, lr: float = 1e-3,
                 cache: Path | None = None, init_from: Path | None = None, batch_size: int = 64,
                 **items_kw) -> FitConfig:
    items = ItemsConfig(kind=kind, **items_kw)
    if kind in ("frozen", "partial", "hybrid", "side"):
        items.cache = str(cache or data.cache())
    if kind == "e2e":
        items.images = str(data.covers)
        items.encoder = TINY_VIT
    return FitConfig(interactions=str(data.interactions), out=str(out), items=items, model=seq_config(),
                     train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, device="cpu", seed=seed,
                                       patience=100),
                     init_from=None if init_from is None else str(init_from))



@functools.lru_cache(maxsize=None)
def cold_run(kind: str):
    """(run dir, FitResult) of a short run on `cold_dataset`: id / frozen 5 epochs, partial 3, e2e 2."""
    data = cold_dataset()
    epochs = {"id": 5, "frozen": 5, "partial": 3, "e2e": 2}[kind]
    out = image_root() / "runs" / f"cold_{kind}"
    return out, fit(image_config(data, out, kind, epochs=epochs))


@functools.lru_cache(maxsize=None)
def transfer_source_run(kind: str = "partial"):
    """(run dir, FitResult): 8 epochs on transfer dataset A."""
    a, _ = transfer_datasets()
    out = image_root() / "runs" / f"transfer_a_{kind}"
    return out, fit(image_config(a, out, kind, epochs=8 if kind != "id" else 2))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def stored_item_vectors(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [N, d], ids [N]) of the run's index."""
    from pixelrec.runs.rundir import RunDir

    index_dir = RunDir(run_dir).published().index_dir
    return np.load(index_dir / "item_vectors.npy"), np.load(index_dir / "item_ids.npy")


def load_pixels(encoder, covers: Path, item_ids) -> torch.Tensor:
    """Preprocessed pixels [n, 3, H, W] of the given items, as `encoder` expects them."""
    from pixelrec.data.images import open_image_store

    loader = encoder.pixel_loader(open_image_store(covers))
    return torch.stack([loader(str(i)) for i in item_ids])


def invoke(args: list) -> "object":
    """Run the click CLI in-process; the session stays quiet afterwards."""
    from click.testing import CliRunner

    from pixelrec.cli import cli
    from pixelrec.runtime import set_quiet

    try:
        return CliRunner().invoke(cli, ["--quiet"] + [str(a) for a in args], catch_exceptions=False)
    finally:
        set_quiet(True)


# ---- module-scoped fixtures over the cold dataset: `from fixtures_images import ds, data, store`


@pytest.fixture(scope="module")
def ds() -> ImageData:
    return cold_dataset()


@pytest.fixture(scope="module")
def data(ds):
    from pixelrec.data.sequences import load_sequences

    return load_sequences(str(ds.interactions))


@pytest.fixture(scope="module")
def store(ds):
    from pixelrec.data.images import open_image_store

    return open_image_store(ds.covers)
