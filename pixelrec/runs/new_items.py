"""Encode new covers through a trained run's item tower (`encode --from-run`, `index --add-images`).

Cold items need no retraining: their vectors come from their images through the same function the
run learned. For `frozen`, `partial` and `side` runs that is the cache's encoder (rebuilt from the
cache's attributes and checked against its weight fingerprint) followed by the run's trained adapter /
top blocks / side network (a `side` run: the encoder's per-layer states at the run's taps, stored as
the cache stores them); for `e2e` runs, the run's tuned encoder. New items of `hybrid` runs have no id embedding: their image
part goes through the hybrid's cold path (`HybridTower.cold_from_image`), the same rule that gives
the run's cold vocabulary items their vectors (and, with `--image-to-id`, a predicted id). The result is an `ImageEncoder`-compatible module, so the ordinary
resumable `encode_images` pipeline writes the vectors into an HDF5 cache.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..encode.cache import open_cache
from ..encode.encoder import EncoderConfig, ImageEncoder, build_encoder
from ..errors import PixelrecError
from ..recommend.build import build_recommender
from ..recommend.config import FitConfig
from ..recommend.image_towers import E2ETower, FrozenTower, HybridTower, PartialTower
from ..recommend.model import Recommender
from ..recommend.side_tower import SideTower
from .rundir import RunDir


class RunItemEncoder(nn.Module):
    """pixels [B, 3, H, W] -> a trained run's item vectors [B, d], with ImageEncoder's interface.

    Wraps `base` (the encoder whose preprocessing and weights the run's inputs came from) and the
    run's trained image tower; `dim` is the recommender's d. For a hybrid run, `hybrid` is the run's
    HybridTower: the image tower's output then takes its cold path (new items have no id).
    """

    def __init__(self, base: ImageEncoder, tower: nn.Module, kind: str, cache_attrs: dict | None, run_dir: str,
                 hybrid: HybridTower | None = None):
        super().__init__()
        self.base, self.tower, self.kind, self.hybrid = base, tower, kind, hybrid
        self.cache_attrs = cache_attrs or {}
        self.run_dir = str(run_dir)
        # what encode_images reads from an encoder (cache attributes, preprocessing, loader)
        self.config = base.config
        self.pooling = f"run:{kind}"
        self.image_size = base.image_size
        self.model_config_json = base.model_config_json
        self.preprocess_cfg = base.preprocess_cfg
        self.preprocess = base.preprocess
        self.supports_split = False
        self.dim = tower.dim

    def pixel_loader(self, store):
        return self.base.pixel_loader(store)

    def check_split(self, k: int) -> None:
        raise PixelrecError("--split-block cannot be combined with --from-run (the output is item vectors)")

    def weights_sha256(self) -> str:
        digest = hashlib.sha256(self.run_dir.encode())
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vectors = self.image_part(pixels)
        return vectors if self.hybrid is None else self.hybrid.cold_from_image(vectors)

    def image_part(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels -> the run's image tower output [B, d] (for a hybrid run, before its cold path)."""
        if self.kind == "e2e":
            return self.tower.from_pixels(pixels)
        if self.kind == "partial":
            tokens = self.base.tokens_at_split(pixels, self.tower.top.k)
            return self.tower.from_tokens(_as_cached(tokens, "float16"))  # the tower trained on float16 tokens
        dtype = self.cache_attrs.get("embedding_dtype", "float16")
        if self.kind == "side":
            emb, _, states = self.base.forward_hidden(pixels, self.tower.taps, self.tower.kind)
            return self.tower.from_states(_as_cached(states, dtype), _as_cached(self._as_stored(emb), dtype))
        return self.tower.adapter(_as_cached(self._as_stored(self.base(pixels)), dtype))  # frozen

    def _as_stored(self, emb: torch.Tensor) -> torch.Tensor:
        """A pooled embedding as the cache holds it (normalised where the cache is)."""
        return F.normalize(emb, dim=-1) if self.cache_attrs.get("normalized") else emb


def _as_cached(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(torch.float16).float() if dtype == "float16" else x.float()


def run_item_encoder(run_dir: str, device: str | torch.device = "cpu") -> RunItemEncoder:
    """The published model's covers -> item vectors function."""
    run = RunDir(run_dir)
    meta = run.read_config()
    cfg = run.fit_config(meta)
    if cfg.items.kind == "id":
        raise PixelrecError(f"{run_dir} is an id run: it has no image tower to encode new covers with "
                            f"(train --items frozen|partial|e2e|hybrid)")
    published = run.published()
    data = run.read_data()
    cfg.items.cache_in_memory = "no"  # only the tower's weights are needed, not the cached tokens
    cfg.items.images = None  # e2e: new covers come as pixels; don't decode the training covers
    model = build_recommender(cfg, data)
    load_model_state(model, run.load_checkpoint(published.checkpoint, "cpu", published.checkpoint_sha256),
                     published.checkpoint)
    return item_encoder_for(model, cfg, meta.get("cache"), str(run_dir)).to(device).eval()


def item_encoder_for(model: Recommender, cfg: FitConfig, cache: dict | None, label: str) -> RunItemEncoder:
    """Covers -> item vectors through `model`'s image tower (new items of a run; `label` names the run).

    `cache`: the identity of the cache the run trained on (config.json), checked against the cache
    file whose encoder is rebuilt for frozen/partial towers.
    """
    hybrid = model.tower if isinstance(model.tower, HybridTower) else None
    tower = model.tower.image if hybrid is not None else model.tower
    kind = cfg.items.image_branch if cfg.items.kind == "hybrid" else cfg.items.kind
    cache_attrs = None
    if isinstance(tower, E2ETower):
        base = tower.encoder
    elif isinstance(tower, (FrozenTower, PartialTower, SideTower)):
        with open_cache(cfg.items.cache) as opened:
            if cache:
                opened.check_identity(cache, f"encoding new covers for {label}")
            cache_attrs = dict(opened.attrs)
        base = build_encoder(EncoderConfig(model=cache_attrs["model"], pretrained=cache_attrs["pretrained"],
                                           pooling=cache_attrs["pooling"], preset=cache_attrs["preset"],
                                           image_size=int(cache_attrs["image_size"]), seed=int(cache_attrs["seed"])))
        if base.weights_sha256() != cache_attrs.get("weights_sha256"):
            raise PixelrecError(f"cannot rebuild the encoder that made {cfg.items.cache} (its weights differ: "
                                f"was --pretrained {cache_attrs['pretrained']} moved or changed?)")
    else:
        raise PixelrecError(f"{label}: the {cfg.items.kind} item tower cannot encode new covers")
    device = next(model.parameters()).device
    return RunItemEncoder(base.to(device), tower, kind, cache_attrs, label, hybrid)


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load a checkpoint's weights, naming the first mismatch when they do not fit the run's config."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise PixelrecError(f"{path}: the weights do not fit the settings in config.json "
                            f"({lines[0] if lines else exc}); the run directory is damaged") from None
