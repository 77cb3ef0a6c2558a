"""Typed configuration of a `fit` run: one dataclass per concern, composed into `FitConfig`.

Every setting is declared once, here. A field holds its default; its metadata (`setting(...)`)
holds the help text, the command-line flag, the allowed values (one module-level constant per
choice list, shared with `check`) and the numeric bounds. `pixelrec fit` builds its options from
these fields (`fit_options`), and `FitConfig.check` refuses values outside them. The few fields
that are deliberately not command-line options are listed in `NOT_OPTIONS` with the reason.

Defaults are our own (tuned on real data, see README "Results"); `--preset pixelrec` switches to
the PixelRec reference code's choices so that its paper figures can be reproduced. Every setting
is written to the run's config.json.

This module does not import torch (the command line reads it to build `fit`'s options); the
sequence encoders and the recommender import their configurations from here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PixelrecError

if TYPE_CHECKING:
    from .towers import ItemTower

# ---------------------------------------------------------------------------------- choice lists
ITEM_KINDS = ("id", "frozen", "partial", "e2e", "hybrid")
CACHE_KINDS = ("frozen", "partial", "hybrid")  # item towers that read an embedding cache (--cache)
IMAGE_KINDS = ("e2e",)  # item towers that read the covers themselves (--images)
ADAPTERS = ("auto", "linear", "mlp")
HEADS = ("pooled", "pooled_relu", "token_relu_mean")
HYBRID_MODES = ("sum", "concat", "switch")
HYBRID_GATES = ("none", "count")
FEATURE_NORMS = ("none", "standardize", "whiten")
IMAGE_BRANCHES = ("frozen", "partial")
CACHE_IN_MEMORY = ("auto", "yes", "no")
MODELS = ("sasrec", "gru4rec")
POSITIONS = ("relative", "absolute")
NORMS = ("pre", "post")  # SASRec LayerNorm placement
NEGATIVE_POOLS = ("train", "all")  # items sampled negatives come from
LOSS_MEANS = ("positions", "sequences")  # what a step's loss is averaged over
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # = runtime.PRECISIONS (this module does not import torch)
DECAY_GROUPS = ("standard", "pixelrec")  # how AdamW parameter groups are formed (build.build_optimizer)
TIES = ("earlier", "later")  # which epoch early stopping keeps when validation scores tie
LOSSES = ("softmax", "bpr")
SOFTMAXES = ("auto", "full", "sampled")  # full or sampled softmax; auto = by modelled cost
MIN_NEGATIVES = 1024  # uniform negatives of a sampled softmax when none are asked for, at least
WINDOWS = ("sliding", "overlapping", "chunks")
PRESET_NAMES = ("default", "pixelrec")

# ------------------------------------------------------------------------- per-model defaults
# Layers when none are asked for: the best on MovieLens-100K with full ranking of the leave-one-out
# test item (benchmarks/ml100k.py); a second GRU layer cost GRU4Rec about 0.01 NDCG@10 there.
DEFAULT_LAYERS = {"sasrec": 2, "gru4rec": 1}
# Learning rate when none is asked for, per sequence model: the best on ML-100K under the same
# protocol (benchmarks/ml100k.py). GRU4Rec at 1e-3 reached the same quality in about twice the epochs.
DEFAULT_LR = {"sasrec": 1e-3, "gru4rec": 2e-3}
# How training sequences are cut when not asked for (batches.py): on ML-100K SASRec gained about
# 0.005 NDCG@10 and 0.01 Recall@10 from `sliding` (each target once, most context) over `overlapping`;
# GRU4Rec did best with `overlapping` every max_len / 2 (each target twice, short and long context).
DEFAULT_WINDOWS = {"sasrec": "sliding", "gru4rec": "overlapping"}

SEED_MAX = 2**32 - 1  # numpy's seed range
IMAGE_SIZE_MAX = 1024  # e2e encoder input side in pixels, as for `encode --image-size` (larger ones exhaust memory)


# ------------------------------------------------------------------------------ field metadata
OPTION = "pixelrec.option"  # the key of a field's OptionSpec in its metadata

PathKind = Literal["file", "dir", "any"]


@dataclass(frozen=True)
class OptionSpec:
    """How a configuration field appears on the command line, and which values it accepts."""

    help: str
    flag: str | None = None  # the option's name; None = "--" + the field name with dashes
    choices: tuple[str, ...] | None = None  # allowed values (a module-level constant)
    default_text: str | None = None  # shown as the default when the field's default (None) is resolved later
    path: PathKind | None = None  # a path option: to a file, a directory, or either
    at_least: float | None = None
    at_most: float | None = None
    below: float | None = None  # exclusive upper bound (dropout rates)


def setting(default: Any = dataclasses.MISSING, *, help: str, **spec: Any) -> Any:
    """A dataclass field that is also a `pixelrec fit` option (see OptionSpec for `spec`)."""
    return field(default=default, metadata={OPTION: OptionSpec(help=help, **spec)})


def per_model(defaults: dict[str, Any]) -> str:
    """Help text for a default that depends on --model, e.g. '2 for sasrec, 1 for gru4rec'."""
    return ", ".join(f"{value:g} for {model}" if isinstance(value, float) else f"{value} for {model}"
                     for model, value in defaults.items())


# ---------------------------------------------------------------------------------- sections
@dataclass
class ItemsConfig:
    """Which item tower, and where its inputs come from."""

    kind: str = setting(
        "id", flag="--items", choices=ITEM_KINDS,
        help="Item tower: id (IDNet), frozen (cached embedding + adapter), partial (cached split-block tokens "
             "+ top encoder blocks), e2e (raw images, PixelNet), hybrid (id + image).")
    cache: str | None = setting(None, path="file", help="HDF5 cache from `pixelrec encode` (frozen/partial/hybrid).")
    images: str | None = setting(None, path="any", help="Covers dir or LMDB (e2e).")
    encoder: str = setting("ViT-B-32", help="open_clip model (e2e).")
    pretrained: str = setting("none", help="none | open_clip tag | local checkpoint path (e2e).")
    image_size: int | None = setting(
        None, at_least=1, at_most=IMAGE_SIZE_MAX, default_text="the model's own",
        help="e2e: encoder input size in pixels (use the cache's size to compare with frozen/partial).")
    tune_blocks: int = setting(-1, at_least=-1, help="e2e: train only the top K encoder blocks (-1 = all).")
    adapter: str = setting(
        "auto", choices=ADAPTERS,
        help="Image embedding -> recommender dim (auto: mlp for frozen, linear after trainable blocks).")
    dropout: float = setting(
        0.0, flag="--item-dropout", at_least=0, below=1,
        help="Image towers: dropout on the image features before the adapter/head (helps cold items).")
    feature_norm: str = setting(
        "none", choices=FEATURE_NORMS,
        help="frozen (and hybrid over frozen): centre the cached embeddings and scale them per feature "
             "(standardize) or decorrelate them (whiten), with the training items' statistics, before the adapter.")
    head: str = setting(
        "pooled", choices=HEADS,
        help="partial/e2e item vector: the encoder's pooled output through the adapter (pooled), ReLU(Linear(pooled "
             "output)) (pooled_relu: the PixelRec code's head for CLIP ResNets and Swin), or PixelRec's ViT head, the "
             "mean over tokens of ReLU(Linear(h)) (token_relu_mean).")
    tune_head: bool = setting(
        True, help="partial/e2e: train the image encoder's own head with the tuned blocks (ViT ln_post / proj, ResNet "
                   "attnpool, timm final norm / proj); --no-tune-head keeps it frozen, as the PixelRec code does for "
                   "CLIP ResNets' attnpool.")
    hybrid: str = setting(
        "sum", choices=HYBRID_MODES,
        help="hybrid: how id and image vectors combine: sum, concat (projected to --dim), or switch (the id "
             "embedding for items with training interactions, the image path for items without).")
    image_branch: str = setting("frozen", choices=IMAGE_BRANCHES, help="hybrid: image tower kind.")
    # The hybrid's cold-start recipes (docs/coldstart.md). Defaults: all three together, the recipe
    # closest to both cold-start bars on the demo's catalogue (benchmarks/coldstart.py --synthetic);
    # 0.0 / none / 0.0 is the plain hybrid (best warm quality, cold items nearly unranked).
    id_dropout: float = setting(
        0.3, at_least=0, below=1,
        help="hybrid: in training, drop a warm item's id part with this probability, so its image part must "
             "stand alone as a cold item's does (DropoutNet).")
    hybrid_gate: str = setting(
        "count", choices=HYBRID_GATES,
        help="hybrid: count = a learned gate on the item's training-interaction count weighs its id part "
             "against its image part (warm items lean on the id, cold ones on the image; it learns the cold "
             "weight from dropped ids, so use it with --id-dropout).")
    image_to_id: float = setting(
        1.0, at_least=0,
        help="hybrid: weight of an auxiliary loss that trains a map from the image part to the item's trained "
             "id embedding; items without an id (cold, new, dropped) use the predicted one. 0 = off.")
    grad_checkpointing: bool = setting(False, help="e2e: trade compute for memory.")
    cache_in_memory: str = setting("auto", choices=CACHE_IN_MEMORY, help="Load the cache into RAM (auto: when it is small).")

    @property
    def uses_cache(self) -> bool:
        """This tower reads an embedding cache made by `pixelrec encode`."""
        return self.kind in CACHE_KINDS


@dataclass
class SequenceConfig:
    """The sequence encoder (user tower): SASRec or GRU4Rec."""

    model: str = setting("sasrec", choices=MODELS, help="Sequence model.")
    dim: int = setting(64, at_least=1, help="Item/user vector size.")
    max_len: int = setting(20, at_least=1, help="Items of history the model sees.")
    layers: int | None = setting(None, at_least=1, default_text=per_model(DEFAULT_LAYERS),
                                 help="Transformer blocks / GRU layers.")
    heads: int = setting(2, at_least=1, help="SASRec attention heads (must divide --dim).")
    inner_mult: int = 4  # SASRec feed-forward width = inner_mult * dim (not an option: NOT_OPTIONS)
    dropout: float = setting(0.3, at_least=0, below=1, help="Dropout in the sequence model.")
    attn_dropout: float = setting(0.3, at_least=0, below=1,
                                  help="SASRec: dropout on the attention weights (0 with --dropout 0 makes "
                                       "training free of dropout, e.g. to compare runs exactly).")
    positions: str = setting(
        "relative", choices=POSITIONS,
        help="SASRec positions: relative (attention bias by distance, trains every position as it is served) "
             "or absolute (learned embeddings, original SASRec / PixelRec).")
    norm: str = setting(
        "pre", choices=NORMS,
        help="SASRec LayerNorm placement: pre (x + f(LN(x)), a final LayerNorm) or post (LN(x + f(x)), eps 1e-12, "
             "no final LayerNorm: RecBole / PixelRec). pre measured better on ML-100K (README).")
    gru_hidden: int = 0  # GRU4Rec hidden size; 0 = 2 * dim (not an option: NOT_OPTIONS)


@dataclass
class LossConfig:
    loss: str = setting("softmax", choices=LOSSES, help="Training loss.")
    softmax: str = setting(
        "auto", choices=SOFTMAXES,
        help="Softmax loss over the whole catalogue (full) or over the batch's targets plus uniform negatives, "
             "log-q corrected (sampled). auto: full unless its modelled cost would exceed the rest of the training "
             "step (README \"Performance\"); config.json records the choice.")
    negatives: int = setting(
        0, at_least=0,
        help="Sampled softmax: uniform negatives per batch (0 = as many as the cost rule affords, at least 1024).")
    negatives_from: str = setting(
        "train", choices=NEGATIVE_POOLS,
        help="Items negatives (bpr, sampled softmax) and full-softmax candidates come from: train = items with "
             "training interactions (an item first seen at test time did not exist yet); all = the whole catalogue, "
             "as the PixelRec code samples.")
    mean_over: str = setting(
        "positions", choices=LOSS_MEANS,
        help="A step's loss: the mean over its trained positions, or (sequences, PixelRec) each window's positions "
             "summed and averaged over the batch's windows, one-item windows kept as members with no target.")
    # auto picks full softmax while its modelled share of a training step stays at most this (NOT_OPTIONS)
    full_softmax_max_share: float = 0.5

    def use_full_softmax(self, tower: ItemTower) -> bool:
        """Full softmax this step? `build_recommender` resolves auto by the cost rule (`resolve_softmax`);
        an unresolved auto (a Recommender built by hand) takes full softmax for cheap towers."""
        if self.softmax == "auto":
            return self.negatives == 0 and tower.cheap
        return self.softmax == "full"

    def uniform_negatives(self) -> int:
        return self.negatives or MIN_NEGATIVES


@dataclass
class TrainConfig:
    epochs: int = setting(200, at_least=1, help="Most epochs (early stopping may end sooner).")
    batch_size: int = setting(128, at_least=1, help="Training windows per step.")
    lr: float | None = setting(None, at_least=0, default_text=per_model(DEFAULT_LR), help="Learning rate.")
    weight_decay: float = setting(0.0, at_least=0, help="AdamW weight decay.")
    encoder_lr: float = setting(1e-4, at_least=0, help="Learning rate of image-encoder blocks.")
    encoder_weight_decay: float = setting(0.0, at_least=0, help="Weight decay of image-encoder blocks.")
    patience: int = setting(10, at_least=1, help="Early stop after this many epochs without a better valid NDCG@10.")
    windows: str | None = setting(
        None, choices=WINDOWS, default_text=per_model(DEFAULT_WINDOWS),
        help="How training sequences are cut: sliding (each target once, in the window where it has the most "
             "context), overlapping (every target of every window), chunks (PixelRec's non-overlapping chunks).")
    stride: int = setting(
        0, help="Sliding windows: a window ends every STRIDE items and trains its newest STRIDE targets "
                "(1 = one sample per prefix, as RecBole). 0 = auto: max-len/6 for id/frozen, max-len/2 for "
                "towers that run image blocks and for overlapping windows.")
    seed: int = setting(0, at_least=0, at_most=SEED_MAX, help="Random seed.")
    deterministic: bool = setting(False, help="Ask torch for deterministic kernels.")
    device: str = setting("auto", help="auto | cpu | cuda[:N]")
    precision: str = setting(
        "auto", choices=PRECISIONS,
        help="CUDA arithmetic: auto (bf16 autocast where supported, else fp16 with loss scaling), fp32 (none), bf16 "
             "or fp16 autocast. CPU runs are always float32.")
    decay_groups: str = setting(
        "standard", choices=DECAY_GROUPS,
        help="AdamW groups: standard = image-encoder blocks at --encoder-lr / --encoder-weight-decay, no decay on "
             "biases, LayerNorms, embeddings and position biases; pixelrec = the whole image tower (blocks and "
             "head/adapter) at --encoder-lr / --encoder-weight-decay, every other parameter at --weight-decay.")
    ties: str = setting(
        "earlier", choices=TIES,
        help="Early stopping on a validation score equal to the best: keep the earlier epoch, or count it as "
             "a gain and keep the later one (PixelRec).")
    eval_batch_size: int = 1024  # (not an option: NOT_OPTIONS)
    min_interactions: int = setting(3, at_least=3, help="Users with fewer are dropped (counted).")
    cold_threshold: int = 1  # evaluation: targets with fewer training interactions are "cold" (NOT_OPTIONS)


# Fields that are deliberately not `pixelrec fit` options ("section.field" -> why). The Python API
# (FitConfig) sets them; config.json records them like every other setting.
NOT_OPTIONS: dict[str, str] = {
    "model.inner_mult": "architecture detail of SASRec's feed-forward block; only --preset pixelrec changes it (to 2)",
    "model.gru_hidden": "GRU4Rec's hidden size follows --dim (2 x dim); a separate knob has not been worth it",
    "loss.full_softmax_max_share": "the cost rule's threshold (full softmax while it is at most this share of "
                                   "a step); --softmax full|sampled and --negatives N already override the rule",
    "train.eval_batch_size": "only trades memory for speed during validation; results do not depend on it",
    "train.cold_threshold": "an evaluation setting: `pixelrec evaluate --cold-threshold N` reports any threshold "
                            "from the trained run",
}

# The PixelRec reference code's choices (westlake-repl/PixelRec, code/: `PixelNet/sasrec.yaml` with
# `overall/ViT.yaml`, launched on four GPUs). Keys are "section.field"; tests/test_reference_preset.py
# checks each one against the reference file and line it comes from.
PIXELREC_PRESET: dict[str, Any] = {
    "model.dim": 512,
    "model.layers": 2,
    "model.heads": 4,
    "model.inner_mult": 2,
    "model.dropout": 0.1,
    "model.attn_dropout": 0.1,
    "model.max_len": 10,
    "model.positions": "absolute",
    "model.norm": "post",
    "train.windows": "chunks",
    "train.lr": 1e-4,
    "train.weight_decay": 0.1,
    "train.encoder_lr": 1e-4,
    "train.encoder_weight_decay": 0.0,
    "train.decay_groups": "pixelrec",
    # the reference stops when an epoch is the 31st in a row without a gain (stopping_step 30,
    # `cur_step > max_step`); ours stops after `patience` epochs without one
    "train.patience": 31,
    "train.ties": "later",
    "train.batch_size": 64,  # global: 16 per GPU x 4 GPUs (split across ranks under torchrun)
    "train.precision": "fp32",
    "loss.loss": "bpr",
    "loss.negatives_from": "all",
    "loss.mean_over": "sequences",
    "items.encoder": "ViT-B-32-quickgelu",
    "items.head": "token_relu_mean",
    "items.tune_blocks": 2,
}

PRESETS: dict[str, dict[str, Any]] = {"default": {}, "pixelrec": PIXELREC_PRESET}


@dataclass
class FitConfig:
    interactions: str = setting(path="file", help="Interaction CSV (item_id,user_id,timestamp).")
    out: str = setting(path="dir", help="Run directory to write.")
    items: ItemsConfig = field(default_factory=ItemsConfig)
    model: SequenceConfig = field(default_factory=SequenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = setting("default", choices=PRESET_NAMES,
                          help="pixelrec: the PixelRec reference code's settings; options you give still win.")
    init_from: str | None = setting(
        None, path="dir", help="Transfer: start from a trained run's sequence encoder and image tower.")

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
            train=_load(TrainConfig, _train_section(d.get("train", {}))),
            preset=d.get("preset", "default"),
            init_from=d.get("init_from"),
        )

    def resolve_defaults(self) -> "FitConfig":
        """Settings left at None (or stride 0) take the chosen sequence model's default, so that
        config.json records what was used. Settings already given are kept."""
        if self.model.layers is None:
            self.model.layers = DEFAULT_LAYERS.get(self.model.model)
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR.get(self.model.model)
        if self.train.windows is None:
            self.train.windows = DEFAULT_WINDOWS.get(self.model.model)
        if self.train.stride == 0:
            self.train.stride = default_stride(self)
        return self

    def validate(self) -> "FitConfig":
        """What `fit` calls first: resolve the model's defaults, then refuse impossible settings."""
        self.resolve_defaults()
        self.check()
        return self

    def check(self) -> None:
        """Raise PixelrecError (one line, naming the option) for the first setting that cannot work.

        Changes nothing; accepts a configuration before or after `resolve_defaults`.
        """
        options = fit_options()
        for opt in options:
            _check_choice(opt, self.get(opt.key))
        self._check_inputs()
        for opt in options:
            _check_number(opt, self.get(opt.key))
        if self.train.stride != 0 and not 1 <= self.train.stride <= self.model.max_len:
            raise PixelrecError(f"--stride must be between 1 and --max-len ({self.model.max_len}), or 0 for auto "
                                f"(got {self.train.stride})")
        for name, value, low in (("model.inner_mult", self.model.inner_mult, 1),
                                 ("model.gru_hidden", self.model.gru_hidden, 0),
                                 ("train.eval_batch_size", self.train.eval_batch_size, 1),
                                 ("train.cold_threshold", self.train.cold_threshold, 0)):
            if value < low:
                raise PixelrecError(f"{name} must be at least {low} (got {value})")
        if not (math.isfinite(self.model.attn_dropout) and 0 <= self.model.attn_dropout < 1):
            raise PixelrecError(f"model.attn_dropout must be in [0, 1) (got {self.model.attn_dropout})")
        share = self.loss.full_softmax_max_share
        if not (math.isfinite(share) and 0 < share < 1):
            raise PixelrecError(f"loss.full_softmax_max_share must be in (0, 1) (got {share})")
        if self.loss.softmax != "auto" and self.loss.loss != "softmax":
            raise PixelrecError(f"--softmax {self.loss.softmax} applies to --loss softmax, not --loss {self.loss.loss}")
        if self.loss.softmax == "full" and self.loss.negatives:
            raise PixelrecError(f"--softmax full scores every item and samples no negatives: drop --negatives "
                                f"{self.loss.negatives} or use --softmax sampled")

    def _check_inputs(self) -> None:
        """The chosen item tower has the inputs it reads, and no input it would ignore."""
        items = self.items
        if items.uses_cache and not items.cache:
            raise PixelrecError(f"--items {items.kind} needs --cache CACHE.h5 (made by `pixelrec encode`)")
        if items.kind in IMAGE_KINDS and not items.images:
            raise PixelrecError("--items e2e needs --images DIR|LMDB (the covers) and --encoder")
        if items.cache and not items.uses_cache:
            raise PixelrecError(f"--cache is read only by --items {_one_of(CACHE_KINDS)}, not by --items "
                                f"{items.kind}; drop --cache or choose one of those towers")
        if items.images and items.kind not in IMAGE_KINDS:
            raise PixelrecError(f"--images is read only by --items {_one_of(IMAGE_KINDS)}, not by --items "
                                f"{items.kind}; drop --images or choose that tower")
        branch = items.image_branch if items.kind == "hybrid" else items.kind
        if not items.tune_head and branch not in ("partial", "e2e"):
            tower = "--items hybrid --image-branch frozen" if items.kind == "hybrid" else f"--items {items.kind}"
            raise PixelrecError(f"--no-tune-head freezes the image encoder's own head, which only --items partial or "
                                f"e2e (or hybrid over partial) train; {tower} has none: drop --no-tune-head")

    # ---- access by "section.field" key (the keys of fit_options, NOT_OPTIONS and the presets)
    def get(self, key: str) -> Any:
        section, _, name = key.rpartition(".")
        return getattr(getattr(self, section) if section else self, name)

    def set(self, key: str, value: Any) -> None:
        section, _, name = key.rpartition(".")
        setattr(getattr(self, section) if section else self, name, value)


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


def _train_section(train: dict[str, Any]) -> dict[str, Any]:
    """Runs written before `precision` existed recorded `amp` (True: autocast on CUDA = auto)."""
    if "precision" in train or "amp" not in train:
        return train
    return {**train, "precision": "auto" if train["amp"] else "fp32"}


def _load(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def apply_preset(cfg: FitConfig, name: str, explicit: set[str] = frozenset()) -> FitConfig:
    """Set the preset's values on cfg, except for keys the user gave explicitly ("section.field")."""
    if name not in PRESETS:
        raise PixelrecError(f"unknown --preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg.preset = name
    for key, value in PRESETS[name].items():
        if key not in explicit:
            cfg.set(key, value)
    return cfg


# ------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class FitOption:
    """One `pixelrec fit` option: the FitConfig field it sets and how it is declared."""

    key: str  # "section.field", or "field" for FitConfig's own fields
    type: type  # int, float, str or bool (Optional removed)
    default: Any  # dataclasses.MISSING for required options
    spec: OptionSpec

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.key.rpartition(".")[2].replace("_", "-")

    @property
    def param_name(self) -> str:
        """The Python name click gives the option's value."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def fit_options() -> tuple[FitOption, ...]:
    """Every field of FitConfig that is a command-line option, in declaration order."""
    return _FIT_OPTIONS


def _options_of(cls: type, prefix: str = "") -> list[FitOption]:
    hints = typing.get_type_hints(cls)
    out: list[FitOption] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _options_of(hint, f"{f.name}.")
        elif OPTION in f.metadata:
            out.append(FitOption(prefix + f.name, _plain_type(hint), f.default, f.metadata[OPTION]))
    return out


def _plain_type(hint: Any) -> type:
    """int | None -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_FIT_OPTIONS = tuple(_options_of(FitConfig))


# ------------------------------------------------------------------------------------- checks
def _one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _check_choice(opt: FitOption, value: Any) -> None:
    choices = opt.spec.choices
    if choices is None or (value is None and opt.default is None) or value in choices:
        return
    raise PixelrecError(f"unknown {opt.flag} {value!r}; expected {_one_of(choices)}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_number(opt: FitOption, value: Any) -> None:
    if value is None or opt.type not in (int, float):
        return
    spec, flag = opt.spec, opt.flag
    if opt.type is float and not math.isfinite(value):
        raise PixelrecError(f"{flag} must be a finite number (got {value})")
    low, high, below = spec.at_least, spec.at_most, spec.below
    if below is not None:
        if not (low is None or low <= value) or not value < below:
            raise PixelrecError(f"{flag} must be in [{_number(low or 0)}, {_number(below)}) (got {value})")
    elif low is not None and high is not None:
        if not low <= value <= high:
            raise PixelrecError(f"{flag} must be between {_number(low)} and {_number(high)} (got {value})")
    elif low is not None and value < low:
        words = "must not be negative" if low == 0 else f"must be at least {_number(low)}"
        raise PixelrecError(f"{flag} {words} (got {value})")
    elif high is not None and value > high:
        raise PixelrecError(f"{flag} must be at most {_number(high)} (got {value})")
