"""Typed configuration of a `fit` run: one dataclass per concern, composed into `FitConfig`.

Every setting is declared once, here. A field holds its default; its metadata (`setting(...)`)
holds the help text, the command-line flag, the allowed values (one module-level constant per
choice list, shared with `check`) and the numeric bounds. `pixelrec fit` builds its options from
these fields (`fit_options`), and `FitConfig.check` refuses values outside them. The few fields
that are deliberately not command-line options are listed in `NOT_OPTIONS` with the reason.

Defaults are our own (tuned on real data, see docs/results.md); `--preset pixelrec` switches to
the PixelRec reference code's choices so that its paper figures can be reproduced. Every setting
is written to the run's config.json.

This module does not import torch (the command line reads it to build `fit`'s options); the
sequence encoders and the recommender import their configurations from here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PixelrecError
from .models.registry import CACHE_MODELS, MODEL_SETTINGS, MODEL_SPECS, SHARED_DEFAULTS, default_of, model_spec

if TYPE_CHECKING:
    from .towers import ItemTower

# ---------------------------------------------------------------------------------- choice lists
ITEM_KINDS = ("id", "frozen", "partial", "e2e", "hybrid", "side")
CACHE_KINDS = ("frozen", "partial", "hybrid", "side")  # item towers that read an embedding cache (--cache)
IMAGE_KINDS = ("e2e",)  # item towers that read the covers themselves (--images)
ADAPTERS = ("auto", "linear", "mlp")
HEADS = ("pooled", "pooled_relu", "token_relu_mean")
HYBRID_MODES = ("sum", "concat", "switch")
HYBRID_GATES = ("none", "count")
FEATURE_NORMS = ("none", "standardize", "whiten")
IMAGE_BRANCHES = ("frozen", "partial", "side")
CACHE_IN_MEMORY = ("auto", "yes", "no")
MODELS = tuple(MODEL_SPECS)  # the sequence models: one ModelSpec each (models/registry.py)
# models with a window stride of their own over cheap towers (`default_stride`), for --stride's help
OWN_STRIDE = " and ".join(name for name, spec in MODEL_SPECS.items() if "train.stride" in spec.defaults)
POSITIONS = ("relative", "absolute")
NORMS = ("pre", "post")  # SASRec LayerNorm placement
CONTEXTS = ("causal", "window")  # FM/DSSM training context (models/fm.py)
NEGATIVE_POOLS = ("train", "all")  # items sampled negatives come from
LOSS_MEANS = ("positions", "sequences")  # what a step's loss is averaged over
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # = runtime.PRECISIONS (this module does not import torch)
DECAY_GROUPS = ("standard", "pixelrec")  # how AdamW parameter groups are formed (build.build_optimizer)
TIES = ("earlier", "later")  # which epoch early stopping keeps when validation scores tie
LOSSES = ("softmax", "bpr")
SOFTMAXES = ("auto", "full", "sampled")  # full or sampled softmax; auto = by modelled cost
MIN_NEGATIVES = 1024  # uniform negatives of a sampled softmax when none are asked for, at least
WINDOWS = ("sliding", "overlapping", "chunks", "prefixes")
PRESET_NAMES = ("default", "pixelrec")

# ------------------------------------------------------------------------- per-model defaults
# Declared by each model's ModelSpec (models/registry.py, with the measurements behind them); these
# views serve the help texts and `resolve_defaults`.
DEFAULT_LAYERS = default_of("model.layers")
DEFAULT_LR = default_of("train.lr")
DEFAULT_WINDOWS = default_of("train.windows")
DEFAULT_DROPOUT = default_of("model.dropout")
DEFAULT_ATTN_DROPOUT = default_of("model.attn_dropout")

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


def _with_others(defaults: dict[str, Any], key: str) -> str:
    """Help text for a shared setting some models default differently: '0.2 for bert4rec, 0.3 for the others'."""
    return f"{per_model(defaults)}, {SHARED_DEFAULTS[key]:g} for the others"


# ---------------------------------------------------------------------------------- sections
@dataclass
class ItemsConfig:
    """Which item tower, and where its inputs come from."""

    kind: str = setting(
        "id", flag="--items", choices=ITEM_KINDS,
        help="Item tower: id (IDNet), frozen (cached embedding + adapter), partial (cached split-block tokens "
             "+ top encoder blocks), e2e (raw images, PixelNet), hybrid (id + image), side (a side network over "
             "the cached per-layer states of `encode --hidden`).")
    cache: str | None = setting(None, path="file",
                                help="HDF5 cache from `pixelrec encode` (frozen/partial/hybrid/side; "
                                     "--model acf / visrank read it whatever the tower).")
    images: str | None = setting(None, path="any", help="Covers dir or LMDB (e2e).")
    follow_symlinks: bool = setting(
        False, help="e2e: also read covers that are symbolic links to files outside the covers folder (otherwise "
                    "they are refused and logged, as `pixelrec encode` does).")
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
    side_dim: int = setting(
        64, at_least=1,
        help="side: bottleneck width of the side network's adapters (IISAN's 64).")
    side_taps: str = setting(
        "all",
        help="side: the cached taps the side network reads: all, even (the even ones and the last) or a list "
             "such as 0,6,12 (a subset of the cache's `encode --taps`).")
    side_residual: bool = setting(
        False,
        help="side: add the frozen tower (cached pooled embedding + adapter) to the side network's output; the "
             "side head starts at zero, so at step 0 the tower equals --items frozen.")
    grad_checkpointing: bool = setting(False, help="e2e: trade compute for memory.")
    cache_in_memory: str = setting("auto", choices=CACHE_IN_MEMORY, help="Load the cache into RAM (auto: when it is small).")

    @property
    def uses_cache(self) -> bool:
        """This tower reads an embedding cache made by `pixelrec encode`."""
        return self.kind in CACHE_KINDS


@dataclass
class SequenceConfig:
    """The sequence encoder (user tower): one of the models of models/registry.py. Fields other than
    SHARED_SETTINGS (registry) are read only by the models whose ModelSpec lists them (`--help` marks them)."""

    model: str = setting("sasrec", choices=MODELS, help="Model: sequential, or non-sequential mf, fm, dssm, vbpr, acf, visrank (docs/models.md).")
    dim: int = setting(64, at_least=1, help="Item/user vector size.")
    max_len: int = setting(20, at_least=1, help="Items of history the model sees.")
    layers: int | None = setting(None, at_least=1, default_text=per_model(DEFAULT_LAYERS),
                                 help="Transformer blocks / GRU layers / repetitions of NextItNet's --dilations / "
                                      "SR-GNN's gated graph steps.")
    heads: int = setting(2, at_least=1, help="Attention heads (must divide --dim).")
    inner_mult: int = 4  # transformer feed-forward width = inner_mult * dim (not an option: NOT_OPTIONS)
    dropout: float | None = setting(None, at_least=0, below=1, default_text=_with_others(DEFAULT_DROPOUT, "model.dropout"),
                                    help="Dropout in the sequence model.")
    attn_dropout: float | None = setting(None, at_least=0, below=1, default_text=_with_others(DEFAULT_ATTN_DROPOUT, "model.attn_dropout"),
                                         help="Dropout on the attention weights (0 with --dropout 0 makes "
                                              "training free of dropout, e.g. to compare runs exactly).")
    positions: str = setting(
        "relative", choices=POSITIONS,
        help="Positions: relative (attention bias by distance, trains every position as it is served) "
             "or absolute (learned embeddings, original SASRec / PixelRec).")
    norm: str = setting(
        "pre", choices=NORMS,
        help="LayerNorm placement: pre (x + f(LN(x)), a final LayerNorm) or post (LN(x + f(x)), eps 1e-12, "
             "no final LayerNorm: RecBole / PixelRec). pre measured better on ML-100K (docs/results.md).")
    gru_hidden: int = 0  # GRU4Rec hidden size; 0 = 2 * dim (not an option: NOT_OPTIONS)
    dilations: str = setting(
        "1,4",
        help="Dilations of one repetition of residual blocks, comma-separated; each block convolves at d "
             "then 2d (kernel 3), so 1,4 gives dilations 1,2,4,8 (the PixelRec code's).")
    interests: int = setting(
        5, at_least=1,
        help="Latent interests the history is aggregated into (k; RecBole's 5, the PixelRec code's 3: 5 measured "
             "better on ML-100K, docs/results.md).")
    mask_ratio: float = setting(
        0.2, at_least=0, at_most=1,
        help="Cloze training: each item of a window is hidden behind the mask vector with this probability (at "
             "least one per window; RecBole 0.2, the PixelRec code 0.6).")
    mask_last: float = setting(
        0.5, at_least=0, at_most=1,
        help="Cloze training: this share of the windows hides only its last item, as the user vector is computed "
             "(RecBole's fix after its issue #1530; the PixelRec code: 0).")
    bert_head: bool = setting(
        True, help="An output head (Linear, GELU, LayerNorm) on the states before scoring (RecBole's, #1839); "
                   "--no-bert-head scores the transformer's output as the PixelRec code does.")
    item_bias: bool = setting(
        False, help="A learned bias per item added to its scores (RecBole's BERT4Rec output bias), served by the same "
                    "dot product: the user vector's last coordinate is the constant 1, so the item vector's last "
                    "coordinate is the item's bias.")
    visrank_k: int = setting(
        1, at_least=1,
        help="VisRank: an item's score is the mean of its k largest cosine similarities to the history's items "
             "(1 = the largest, the PixelRec code's top_num).")
    dssm_mlp: str = setting(
        "", default_text="none", help="Hidden sizes of an MLP on DSSM's user side (mean history vector -> tanh layers -> --dim), "
                 "comma-separated; empty = none, as the PixelRec code's mlp_hidden_size: [].")
    context: str = setting(
        "causal", choices=CONTEXTS,
        help="FM/DSSM training: causal (each item of a window is trained from the items before it, as it is "
             "served) or window (from every other item of its window, before and after: the PixelRec code's "
             "training; needs --windows chunks or overlapping).")


@dataclass
class LossConfig:
    loss: str = setting("softmax", choices=LOSSES, help="Training loss.")
    softmax: str = setting(
        "auto", choices=SOFTMAXES,
        help="Softmax loss over the whole catalogue (full) or over the batch's targets plus uniform negatives, "
             "log-q corrected (sampled). auto: sampled only where that makes the modelled training step at least 3x "
             "cheaper with at most a quarter of the catalogue as negatives, else full (docs/performance.md); "
             "config.json records the choice and its modelled costs.")
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
    # the cost rule's budget: a sampled softmax may cost max_share / (1 - max_share) of the rest of the
    # step (0.5: as much as the rest), which sets its negatives (losses.plan_softmax; NOT_OPTIONS)
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
             "context), overlapping (every target of every window), chunks (PixelRec's non-overlapping chunks), "
             "prefixes (every prefix -> its next item, one target per window: the only one for lightsans). bert4rec "
             "(cloze) takes chunks or overlapping.")
    stride: int = setting(
        0, help="Sliding windows: a window ends every STRIDE items and trains its newest STRIDE targets "
                "(1 = one sample per prefix, as RecBole). 0 = auto: max-len/6 for id/frozen, max-len/2 for "
                f"towers that run image blocks and for overlapping windows, 1 for {OWN_STRIDE} over id/frozen.")
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
    "loss.full_softmax_max_share": "the cost rule's budget for the sampled softmax (its logits may cost s / (1 - s) "
                                   "of the rest of the step; 0.5: as much); --softmax full|sampled and --negatives N "
                                   "already override the rule",
    "train.eval_batch_size": "only trades memory for speed during validation; results do not depend on it",
    "train.cold_threshold": "an evaluation setting: `pixelrec evaluate --cold-threshold N` reports any threshold "
                            "from the trained run",
}

# The PixelRec reference code's choices (westlake-repl/PixelRec, code/: `PixelNet/<model>.yaml` with
# `overall/ViT.yaml`, launched on four GPUs) shared by every model; each model's own (architecture,
# lr, batch, weight decay) are in its ModelSpec's presets and win over these (`preset_values`).
# Keys are "section.field"; tests/test_reference_preset.py checks each one against the reference
# file and line it comes from.
PIXELREC_PRESET: dict[str, Any] = {
    "model.max_len": 10,
    "train.windows": "chunks",
    "train.encoder_lr": 1e-4,
    "train.encoder_weight_decay": 0.0,
    "train.decay_groups": "pixelrec",
    # the reference stops when an epoch is the 31st in a row without a gain (stopping_step 30,
    # `cur_step > max_step`); ours stops after `patience` epochs without one
    "train.patience": 31,
    "train.ties": "later",
    "train.precision": "fp32",
    "loss.loss": "bpr",
    "loss.negatives_from": "all",
    "loss.mean_over": "sequences",
    "items.encoder": "ViT-B-32-quickgelu",
    "items.head": "token_relu_mean",
    "items.tune_blocks": 2,
}

PRESETS: dict[str, dict[str, Any]] = {"default": {}, "pixelrec": PIXELREC_PRESET}


def preset_values(name: str, model: str) -> dict[str, Any]:
    """What preset `name` sets for sequence model `model`: the shared values, then the model's own."""
    return {**PRESETS[name], **model_spec(model).presets.get(name, {})}


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

    def record(self) -> dict[str, Any]:
        """The settings as config.json records them: `to_dict`, with the settings this item tower and
        sequence model do not read (`unused_settings`) written as null."""
        d = self.to_dict()
        for key in unused_settings(self.items.kind, self.items.image_branch, self.model.model):
            section, _, name = key.partition(".")
            d[section][name] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitConfig":
        """The inverse of `record` (and of `to_dict`): a null setting that the run's tower or model
        does not read takes its default; missing settings (runs written before they existed) too."""
        items, model = d.get("items", {}), d.get("model", {})
        unused = unused_settings(items.get("kind") or "id", items.get("image_branch") or "frozen",
                                 model.get("model") or "sasrec")
        sections = {name: _drop_unused(d.get(name, {}), name, unused) for name in ("items", "model", "loss", "train")}
        return cls(
            interactions=d["interactions"],
            out=d["out"],
            items=_load(ItemsConfig, sections["items"]),
            # runs written before `positions` existed used absolute positions
            model=_load(SequenceConfig, {"positions": "absolute", **sections["model"]}),
            loss=_load(LossConfig, sections["loss"]),
            train=_load(TrainConfig, _train_section(sections["train"])),
            preset=d.get("preset", "default"),
            init_from=d.get("init_from"),
        )

    def resolve_defaults(self) -> "FitConfig":
        """Settings left at None (or stride 0) take the chosen sequence model's default (its ModelSpec),
        so that config.json records what was used. Settings already given are kept."""
        spec = MODEL_SPECS.get(self.model.model)
        if spec and "context" in spec.reads and self.model.context == "window" and self.train.windows is None:
            self.train.windows = "chunks"  # the windows of --context window (the PixelRec code's)
        for key, value in [*(spec.defaults.items() if spec else ()), *SHARED_DEFAULTS.items()]:
            if self.get(key) is None:
                self.set(key, value)
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
        self._check_model()
        for name, value, low in (("model.inner_mult", self.model.inner_mult, 1),
                                 ("model.gru_hidden", self.model.gru_hidden, 0),
                                 ("train.eval_batch_size", self.train.eval_batch_size, 1),
                                 ("train.cold_threshold", self.train.cold_threshold, 0)):
            if value < low:
                raise PixelrecError(f"{name} must be at least {low} (got {value})")
        if self.model.attn_dropout is not None and not (math.isfinite(self.model.attn_dropout)
                                                          and 0 <= self.model.attn_dropout < 1):
            raise PixelrecError(f"model.attn_dropout must be in [0, 1) (got {self.model.attn_dropout})")
        share = self.loss.full_softmax_max_share
        if not (math.isfinite(share) and 0 < share < 1):
            raise PixelrecError(f"loss.full_softmax_max_share must be in (0, 1) (got {share})")
        if self.loss.softmax != "auto" and self.loss.loss != "softmax":
            raise PixelrecError(f"--softmax {self.loss.softmax} applies to --loss softmax, not --loss {self.loss.loss}")
        if self.loss.softmax == "full" and self.loss.negatives:
            raise PixelrecError(f"--softmax full scores every item and samples no negatives: drop --negatives "
                                f"{self.loss.negatives} or use --softmax sampled")

    def _check_model(self) -> None:
        """The training windows suit the model's objective, and its own settings are valid."""
        spec, windows = model_spec(self.model.model), self.train.windows
        if spec.objective == "prefix" and windows not in (None, "prefixes"):
            raise PixelrecError(f"--windows {windows} trains several positions of a window at once, which needs a "
                                f"causal model; --model {spec.name} attends over its whole window: use --windows "
                                f"prefixes (one target per prefix)")
        if spec.objective == "cloze" and windows in ("sliding", "prefixes"):
            raise PixelrecError(f"--windows {windows} cuts windows for next-item targets; --model {spec.name} hides "
                                f"items anywhere in a window (cloze): use --windows chunks or overlapping")
        if "context" in spec.reads and self.model.context == "window" and windows in ("sliding", "prefixes"):
            raise PixelrecError(f"--windows {windows} cuts windows for next-item targets; --context window trains "
                                f"each item of a window from the others: use --windows chunks or overlapping")
        if windows == "prefixes" and self.train.stride not in (0, 1):
            raise PixelrecError(f"--stride applies to sliding and overlapping windows, not to --windows prefixes "
                                f"(every prefix is one window); drop --stride {self.train.stride}")
        if "dilations" in spec.reads:
            parse_dilations(self.model.dilations)
        if "dssm_mlp" in spec.reads:
            parse_sizes(self.model.dssm_mlp)
        if spec.name == "vbpr":
            self._check_vbpr()
        if spec.name == "visrank" and (self.items.kind != "frozen" or not self.items.cache):
            # no item tower of its own: any other --items would be silently ignored
            raise PixelrecError("--model visrank ranks items by their cached embeddings as they are: use --items frozen "
                                "--cache CACHE.h5 (made by `pixelrec encode --images COVERS --out CACHE.h5`)")
        if spec.name == "acf" and not self.items.cache:
            raise PixelrecError("--model acf attends over each item's cached image tokens: give --cache CACHE.h5 "
                                "(made by `pixelrec encode --images COVERS --out CACHE.h5 --split-block 1`)")

    def _check_vbpr(self) -> None:
        """VBPR reads each item's frozen cached embedding through its own linear projection."""
        items = self.items
        if items.kind != "frozen" or not items.cache:
            raise PixelrecError("--model vbpr reads each item's frozen cached embedding: use --items frozen --cache "
                                "CACHE.h5 (made by `pixelrec encode --images COVERS --out CACHE.h5`)")
        if items.adapter not in ("auto", "linear"):
            raise PixelrecError(f"--model vbpr projects the cached embedding linearly (E f_i and the visual bias); "
                                f"drop --adapter {items.adapter}")

    def _check_inputs(self) -> None:
        """The chosen item tower has the inputs it reads, and no input it would ignore."""
        items = self.items
        if items.uses_cache and not items.cache:
            raise PixelrecError(f"--items {items.kind} needs --cache CACHE.h5 (made by `pixelrec encode`)")
        if items.kind in IMAGE_KINDS and not items.images:
            raise PixelrecError("--items e2e needs --images DIR|LMDB (the covers) and --encoder")
        if items.cache and not items.uses_cache and self.model.model not in CACHE_MODELS:
            raise PixelrecError(f"--cache is read only by --items {_one_of(CACHE_KINDS)}, not by --items "
                                f"{items.kind}; drop --cache or choose one of those towers")
        if items.images and items.kind not in IMAGE_KINDS:
            raise PixelrecError(f"--images is read only by --items {_one_of(IMAGE_KINDS)}, not by --items "
                                f"{items.kind}; drop --images or choose that tower")
        if items.follow_symlinks and items.kind not in IMAGE_KINDS:
            raise PixelrecError(f"--follow-symlinks is read only by --items {_one_of(IMAGE_KINDS)} (its covers folder), "
                                f"not by --items {items.kind}; drop --follow-symlinks")
        branch = items.image_branch if items.kind == "hybrid" else items.kind
        defaults = {f.name: f.default for f in dataclasses.fields(ItemsConfig)}
        side_given = ["--" + name.replace("_", "-") for name in ("side_dim", "side_taps", "side_residual")
                      if getattr(items, name) != defaults[name]]
        if side_given and branch != "side":
            raise PixelrecError(f"{side_given[0]} shapes the side network of --items side (or hybrid --image-branch "
                                f"side); --items {items.kind} has none: drop {side_given[0]}")
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
    over partial); max_len // 2 for `overlapping` windows; a model's own `train.stride` default with
    cheap towers (BERT4Rec and NextItNet: 1, every prefix ends a window, as RecBole trains them).

    A window trains its newest `stride` targets, so a smaller stride gives every target more context
    and each step fewer, less correlated targets, at the cost of more windows per epoch. On ML-100K
    (L 20, benchmarks/ml100k.py, 3-4 seeds) SASRec's mean test NDCG@10 was 0.113 at stride 5 and
    0.119 at stride 3; for GRU4Rec, sliding windows did worse than overlapping ones (DEFAULT_WINDOWS).
    """
    if cfg.train.windows == "prefixes":
        return 1  # a window ends at every item
    image_blocks = cfg.items.kind in ("partial", "e2e") or (cfg.items.kind == "hybrid" and cfg.items.image_branch == "partial")
    spec = MODEL_SPECS.get(cfg.model.model)
    if not image_blocks and spec is not None and "train.stride" in spec.defaults:  # the model's own (1)
        return min(spec.defaults["train.stride"], cfg.model.max_len)
    if image_blocks or cfg.train.windows != "sliding":
        return max(1, cfg.model.max_len // 2)
    return max(1, cfg.model.max_len // 6)


# ------------------------------------------------------------------ settings a run does not read
# Item-tower settings and the image branches that read them (a hybrid's branch is --image-branch);
# every other tower ignores them, and config.json records them as null.
_ITEM_SETTING_BRANCHES: dict[str, tuple[str, ...]] = {
    "encoder": ("e2e",),
    "follow_symlinks": ("e2e",),
    "pretrained": ("e2e",),
    "image_size": ("e2e",),
    "tune_blocks": ("partial", "e2e"),  # partial: the split block `--preset pixelrec` checks the cache for
    "adapter": ("frozen", "partial", "e2e", "side"),  # side: the frozen part of --side-residual
    "dropout": ("frozen", "partial", "e2e", "side"),
    "feature_norm": ("frozen",),
    "head": ("frozen", "partial", "e2e"),  # frozen: the pooling `--preset pixelrec` checks the cache for
    "tune_head": ("partial", "e2e"),
    "grad_checkpointing": ("partial", "e2e"),
    "cache_in_memory": ("partial", "e2e", "side"),
    "side_dim": ("side",),
    "side_taps": ("side",),
    "side_residual": ("side",),
}
_HYBRID_SETTINGS = ("hybrid", "image_branch", "id_dropout", "hybrid_gate", "image_to_id")
# Sequence-model settings and the models that read them: models/registry.py (MODEL_SETTINGS).


def unused_settings(kind: str, image_branch: str, model: str) -> set[str]:
    """Keys ("section.field") of the settings that item tower `kind` (over `image_branch` when it is
    a hybrid) and sequence model `model` never read: config.json writes them as null."""
    branch = image_branch if kind == "hybrid" else kind
    out = {f"items.{name}" for name, branches in _ITEM_SETTING_BRANCHES.items() if branch not in branches}
    if kind != "hybrid":
        out |= {f"items.{name}" for name in _HYBRID_SETTINGS}
    out |= {f"model.{name}" for name, readers in MODEL_SETTINGS.items() if model not in readers}
    return out


def parse_dilations(text: str) -> tuple[int, ...]:
    """"1,4" -> (1, 4); PixelrecError naming --dilations for anything but positive integers."""
    try:
        values = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise PixelrecError(f"--dilations must be positive integers separated by commas, e.g. 1,4 (got {text!r})")
    return values


def parse_sizes(text: str) -> tuple[int, ...]:
    """"256,128" -> (256, 128), "" -> (); PixelrecError naming --dssm-mlp for anything but positive integers."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise PixelrecError(f"--dssm-mlp must be positive integers separated by commas, e.g. 256,256, or empty "
                            f"(got {text!r})")
    return values


def check_model_options(model: str, given: set[str] | frozenset[str]) -> None:
    """Refuse (one line naming the model) a setting given for a sequence model that does not read it."""
    spec = model_spec(model)
    for key in sorted(given):
        section, _, name = key.partition(".")
        if section == "model" and name in MODEL_SETTINGS and model not in MODEL_SETTINGS[name]:
            flag = next((o.flag for o in fit_options() if o.key == key), key)
            raise PixelrecError(f"{flag} is not a setting of --model {spec.name} (it is read by --model "
                                f"{_one_of(MODEL_SETTINGS[name])}); drop it")


def check_window_options(cfg: FitConfig, typed: set[str] | frozenset[str]) -> None:
    """Refuse a --stride typed on the command line for --windows chunks (given, or the model's or preset's
    default), which have none: back-to-back chunks of max_len + 1 items. Only typed keys count: a run's
    config.json given back with --config records the stride resolved for it, which its chunks ignored."""
    if "train.stride" not in typed or cfg.train.stride == 0:
        return
    windows = cfg.train.windows or copy.deepcopy(cfg).resolve_defaults().train.windows
    if windows == "chunks":
        raise PixelrecError(f"--stride applies to sliding and overlapping windows, not to --windows chunks "
                            f"(back-to-back chunks of --max-len + 1 items); drop --stride {cfg.train.stride}")


def _drop_unused(section: Any, name: str, unused: set[str]) -> Any:
    """A config.json section without the null settings its run does not read (they take defaults)."""
    if not isinstance(section, dict):
        return section
    return {k: v for k, v in section.items() if not (v is None and f"{name}.{k}" in unused)}


# Settings that older runs' config.json may hold and this version no longer has; reading such a run
# ignores them (their meaning is carried by what replaced them). A key neither current nor listed here
# was written by a newer pixelrec, and reading its run is refused (runs/rundir.py).
RETIRED_SETTINGS = {
    "loss.full_softmax_max_items": "the full/sampled softmax cost rule (loss.softmax auto) replaced it",
    "train.amp": "train.precision replaced it (amp true = auto)",
}


def _train_section(train: dict[str, Any]) -> dict[str, Any]:
    """Runs written before `precision` existed recorded `amp` (True: autocast on CUDA = auto)."""
    if "precision" in train or "amp" not in train:
        return train
    return {**train, "precision": "auto" if train["amp"] else "fp32"}


def _load(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def apply_preset(cfg: FitConfig, name: str, explicit: set[str] = frozenset()) -> FitConfig:
    """Set the preset's values for cfg's sequence model on cfg, except for keys the user gave explicitly
    ("section.field"); a given setting the model does not read is refused (`check_model_options`)."""
    if name not in PRESETS:
        raise PixelrecError(f"unknown --preset {name!r}; expected one of {', '.join(PRESETS)}")
    check_model_options(cfg.model.model, explicit)
    cfg.preset = name
    for key, value in preset_values(name, cfg.model.model).items():
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
            out.append(FitOption(prefix + f.name, _plain_type(hint), f.default, _marked(prefix, f.name, f.metadata[OPTION])))
    return out


def _marked(prefix: str, name: str, spec: OptionSpec) -> OptionSpec:
    """A model-specific option's help starts with the models that read it: "[sasrec, lightsans] ..."."""
    readers = MODEL_SETTINGS.get(name) if prefix == "model." else None
    return dataclasses.replace(spec, help=f"[{', '.join(readers)}] {spec.help}") if readers else spec


def _plain_type(hint: Any) -> type:
    """int | None -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_FIT_OPTIONS = tuple(_options_of(FitConfig))


# ------------------------------------------------------------------------------------- checks
def check_option_value(opt: FitOption, value: Any) -> None:
    """Raise PixelrecError (naming the option) when `value` is outside the option's choices or bounds."""
    _check_choice(opt, value)
    _check_number(opt, value)


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
