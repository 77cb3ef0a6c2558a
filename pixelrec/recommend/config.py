"""Typed configuration of a `fit` run: one dataclass per concern, composed into `FitConfig`.

Defaults are our own (tuned on real data, see README "Results"); `--preset pixelrec` switches to
the PixelRec reference code's choices (SPEC §6) so its paper figures can be reproduced.
Every setting is written to the run's config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import PixelrecError
from .model import LossConfig
from .sequence import DEFAULT_LAYERS, SequenceConfig

ITEM_KINDS = ("id", "frozen", "partial", "e2e", "hybrid")
CACHE_KINDS = ("frozen", "partial", "hybrid")  # item towers that read an embedding cache (--cache)


@dataclass
class ItemsConfig:
    """Which item tower, and where its inputs come from."""

    kind: str = "id"  # id | frozen | partial | e2e | hybrid
    cache: str | None = None  # HDF5 cache from `pixelrec encode` (frozen / partial / hybrid)
    images: str | None = None  # covers dir or LMDB (e2e)
    encoder: str = "ViT-B-32"  # open_clip model (e2e)
    pretrained: str = "none"  # none | open_clip tag | local checkpoint path (e2e)
    image_size: int | None = None  # e2e: encoder input size (None = the model's own); match the cache's to compare
    tune_blocks: int = -1  # e2e: train only the top K encoder blocks (-1 = all)
    adapter: str = "auto"  # auto | linear | mlp: pooled embedding -> d (auto: mlp for frozen, else linear)
    dropout: float = 0.0  # dropout on the image features entering the adapter / token head
    head: str = "pooled"  # pooled | token_relu_mean (PixelRec: mean over tokens of ReLU(Linear(h)))
    hybrid: str = "sum"  # hybrid: sum | concat (id + image, concat is projected back to d)
    image_branch: str = "frozen"  # hybrid: frozen | partial
    grad_checkpointing: bool = False  # e2e
    cache_in_memory: str = "auto"  # auto | yes | no: load the cache into RAM

    @property
    def uses_cache(self) -> bool:
        """This tower reads an embedding cache made by `pixelrec encode`."""
        return self.kind in CACHE_KINDS


# Learning rate when none is asked for, per sequence model: the best on ML-100K under SPEC §7
# (benchmarks/ml100k.py). GRU4Rec at 1e-3 reached the same quality in about twice the epochs.
DEFAULT_LR = {"sasrec": 1e-3, "gru4rec": 2e-3}
# How training sequences are cut when not asked for (batches.py): on ML-100K SASRec gained about
# 0.005 NDCG@10 and 0.01 Recall@10 from `sliding` (each target once, most context) over `overlapping`;
# GRU4Rec did best with `overlapping` every max_len / 2 (each target twice, short and long context).
DEFAULT_WINDOWS = {"sasrec": "sliding", "gru4rec": "overlapping"}


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float | None = None  # None = the sequence model's default (DEFAULT_LR)
    weight_decay: float = 0.0
    encoder_lr: float = 1e-4  # image-encoder blocks (partial / e2e)
    encoder_weight_decay: float = 0.0
    patience: int = 10  # early stop after this many epochs without a better valid NDCG@10
    windows: str | None = None  # sliding | overlapping | chunks (PixelRec); None = the model's default (DEFAULT_WINDOWS)
    stride: int = 0  # sliding windows: a window ends every `stride` items; 0 = auto (default_stride)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA
    eval_batch_size: int = 1024
    min_interactions: int = 3
    cold_threshold: int = 1  # evaluation: targets with fewer training interactions are "cold"


@dataclass
class FitConfig:
    interactions: str
    out: str
    items: ItemsConfig = field(default_factory=ItemsConfig)
    model: SequenceConfig = field(default_factory=SequenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "default"
    init_from: str | None = None  # transfer: start from a trained run's sequence encoder and image tower

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitConfig":
        return cls(
            interactions=d["interactions"],
            out=d["out"],
            items=_load(ItemsConfig, d.get("items", {})),
            # runs written before `positions` existed used absolute positions
            model=_load(SequenceConfig, {"positions": "absolute", **d.get("model", {})}),
            loss=_load(LossConfig, d.get("loss", {})),
            train=_load(TrainConfig, d.get("train", {})),
            preset=d.get("preset", "default"),
            init_from=d.get("init_from"),
        )

    def fill_model_defaults(self) -> "FitConfig":
        """Settings left at None take the chosen sequence model's default (so config.json records them)."""
        if self.model.layers is None:
            self.model.layers = DEFAULT_LAYERS.get(self.model.model)
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR.get(self.model.model)
        if self.train.windows is None:
            self.train.windows = DEFAULT_WINDOWS.get(self.model.model)
        if self.train.stride == 0:
            self.train.stride = default_stride(self)
        return self

    def validate(self) -> None:
        """Fill the model's defaults, then refuse impossible settings with a one-line error."""
        if self.model.model not in DEFAULT_LAYERS:
            raise PixelrecError(f"unknown --model {self.model.model!r}; expected one of {', '.join(DEFAULT_LAYERS)}")
        self.fill_model_defaults()
        if self.items.kind not in ITEM_KINDS:
            raise PixelrecError(f"unknown --items {self.items.kind!r}; expected one of {', '.join(ITEM_KINDS)}")
        if self.model.positions not in ("relative", "absolute"):
            raise PixelrecError(f"unknown --positions {self.model.positions!r}; expected relative or absolute")
        if self.loss.loss not in ("softmax", "bpr"):
            raise PixelrecError(f"unknown --loss {self.loss.loss!r}; expected softmax or bpr")
        if self.train.windows not in ("sliding", "overlapping", "chunks"):
            raise PixelrecError(f"unknown --windows {self.train.windows!r}; expected sliding, overlapping or chunks")
        if self.items.uses_cache and not self.items.cache:
            raise PixelrecError(f"--items {self.items.kind} needs --cache CACHE.h5 (made by `pixelrec encode`)")
        if self.items.kind == "e2e" and not self.items.images:
            raise PixelrecError("--items e2e needs --images DIR|LMDB (the covers) and --encoder")
        for name, value in (("--max-len", self.model.max_len), ("--dim", self.model.dim),
                            ("--epochs", self.train.epochs), ("--batch-size", self.train.batch_size),
                            ("--heads", self.model.heads), ("--layers", self.model.layers),
                            ("--patience", self.train.patience),
                            ("--image-size", 1 if self.items.image_size is None else self.items.image_size)):
            if value < 1:
                raise PixelrecError(f"{name} must be at least 1 (got {value})")
        if not 1 <= self.train.stride <= self.model.max_len:
            raise PixelrecError(f"--stride must be between 1 and --max-len ({self.model.max_len}), or 0 for auto "
                                f"(got {self.train.stride})")
        for name, value in (("--dropout", self.model.dropout), ("attention dropout", self.model.attn_dropout),
                            ("--item-dropout", self.items.dropout)):
            if not 0 <= value < 1:
                raise PixelrecError(f"{name} must be in [0, 1) (got {value})")
        for name, value in (("--lr", self.train.lr), ("--encoder-lr", self.train.encoder_lr),
                            ("--weight-decay", self.train.weight_decay),
                            ("--encoder-weight-decay", self.train.encoder_weight_decay),
                            ("--negatives", self.loss.negatives)):
            if value < 0:
                raise PixelrecError(f"{name} must not be negative (got {value})")


def default_stride(cfg: FitConfig) -> int:
    """Window stride when none is asked for: for `sliding` windows max_len // 6 with cheap item towers
    (id, frozen), max_len // 2 with towers that run image blocks on every batch (partial, e2e, hybrid
    over partial); max_len // 2 for `overlapping` windows.

    A window trains its newest `stride` targets, so a smaller stride gives every target more context
    and each step fewer, less correlated targets, at the cost of more windows per epoch. On ML-100K
    (L 20, benchmarks/ml100k.py, 3-4 seeds) SASRec's mean test NDCG@10 was 0.113 at stride 5 and
    0.119 at stride 3; for GRU4Rec, sliding windows did worse than overlapping ones (DEFAULT_WINDOWS).
    """
    image_blocks = cfg.items.kind in ("partial", "e2e") or (cfg.items.kind == "hybrid" and cfg.items.image_branch == "partial")
    if image_blocks or cfg.train.windows != "sliding":
        return max(1, cfg.model.max_len // 2)
    return max(1, cfg.model.max_len // 6)


def _load(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# The PixelRec reference code's choices (SPEC §6). Keys are "section.field".
PIXELREC_PRESET: dict[str, Any] = {
    "model.dim": 512,
    "model.layers": 2,
    "model.heads": 4,
    "model.inner_mult": 2,
    "model.dropout": 0.1,
    "model.attn_dropout": 0.1,
    "model.max_len": 10,
    "model.positions": "absolute",
    "train.windows": "chunks",
    "train.lr": 1e-4,
    "train.weight_decay": 0.1,
    "train.encoder_lr": 1e-4,
    "train.encoder_weight_decay": 0.0,
    "train.patience": 30,
    "train.batch_size": 16,
    "loss.loss": "bpr",
    "items.head": "token_relu_mean",
    "items.tune_blocks": 2,
}

PRESETS = {"default": {}, "pixelrec": PIXELREC_PRESET}


def apply_preset(cfg: FitConfig, name: str, explicit: set[str] = frozenset()) -> FitConfig:
    """Set the preset's values on cfg, except for keys the user gave explicitly ("section.field")."""
    if name not in PRESETS:
        raise PixelrecError(f"unknown --preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg.preset = name
    for key, value in PRESETS[name].items():
        if key in explicit:
            continue
        section, fld = key.split(".")
        setattr(getattr(cfg, section), fld, value)
    return cfg
