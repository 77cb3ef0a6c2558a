"""The sequence models `pixelrec fit --model` offers, one `ModelSpec` each (this module does not import torch).

A spec is the one place that says what a model is: the settings it reads beyond the shared ones
(`--dim`, `--max-len`, `--layers`, `--dropout`), its defaults, its `--preset` values, its training
objective and the class that builds it. `recommend.config` derives the command line's choices, the
per-model default texts, the null settings of config.json and the refusal of options a model does
not have from these specs; `models.build_sequence_encoder` builds the class.

Objectives (how training windows are cut, `--windows`):
- ``causal``: the state at a position sees only the items up to it, so one window trains the next
  item at every position (sliding, overlapping or chunks windows; prefixes too).
- ``prefix``: states attend over the whole window, so only its last position may be trained: every
  prefix of a training sequence is one window that trains the item after it (`--windows prefixes`,
  the PixelRec code's AUGSEQ and RecBole's augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

OBJECTIVES = ("causal", "prefix")
# Settings every model reads (SequenceConfig fields); the others belong to the models that list them.
SHARED_SETTINGS = ("model", "dim", "max_len", "layers", "dropout")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str  # one line for docs and --help
    reads: tuple[str, ...]  # SequenceConfig fields it reads besides SHARED_SETTINGS
    defaults: Mapping[str, Any]  # "model.layers", "train.lr", "train.windows": used when not given
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # preset name -> {"section.field": value}
    objective: str = "causal"
    factory: str = ""  # "module:Class" under pixelrec.recommend.models, built with the SequenceConfig


# The PixelRec reference's values (westlake-repl/PixelRec code/, PixelNet/<model>.yaml and the README's
# PixelNet training table); tests/test_reference_preset.py cites the file and line of each.
SASREC = ModelSpec(
    name="sasrec",
    summary="self-attentive transformer over the history (Kang & McAuley 2018)",
    reads=("heads", "attn_dropout", "positions", "norm", "inner_mult"),
    # layers, lr, windows: the best on MovieLens-100K with full ranking of the leave-one-out test item
    # (benchmarks/ml100k.py); `sliding` windows gained SASRec about 0.005 NDCG@10 over `overlapping`.
    defaults={"model.layers": 2, "train.lr": 1e-3, "train.windows": "sliding"},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 2, "model.heads": 4, "model.inner_mult": 2, "model.dropout": 0.1,
        "model.attn_dropout": 0.1, "model.positions": "absolute", "model.norm": "post",
        "train.lr": 1e-4, "train.weight_decay": 0.1, "train.batch_size": 64,
    }},
    factory="sasrec:SASRec",
)
GRU4REC = ModelSpec(
    name="gru4rec",
    summary="GRU over the history (Hidasi et al. 2016), projected back to the item space",
    reads=("gru_hidden",),
    # a second GRU layer cost about 0.01 NDCG@10 on ML-100K; at lr 1e-3 it took twice the epochs;
    # `overlapping` windows every max_len / 2 did best for it
    defaults={"model.layers": 1, "train.lr": 2e-3, "train.windows": "overlapping"},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 1, "model.gru_hidden": 512, "model.dropout": 0.0,
        "train.lr": 1e-4, "train.weight_decay": 0.01, "train.batch_size": 64,
    }},
    factory="gru4rec:GRU4Rec",
)
NEXTITNET = ModelSpec(
    name="nextitnet",
    summary="causal dilated residual CNN (Yuan et al. 2019)",
    reads=("dilations",),
    # layers = repetitions of the --dilations blocks; 1 already sees 30 items back (kernel 3, dilations
    # 1,2,4,8). Not tuned yet: SASRec's lr and windows (first ML-100K figures: docs/models.md)
    defaults={"model.layers": 1, "train.lr": 1e-3, "train.windows": "sliding"},
    presets={"pixelrec": {
        "model.dim": 1024, "model.layers": 3, "model.dilations": "1,4", "model.dropout": 0.0,
        "train.lr": 1e-4, "train.weight_decay": 0.01, "train.batch_size": 64,
    }},
    factory="nextitnet:NextItNet",
)
LIGHTSANS = ModelSpec(
    name="lightsans",
    summary="low-rank self-attention over k latent interests, decoupled positions (Fan et al. 2021)",
    reads=("heads", "attn_dropout", "inner_mult", "interests"),
    # the reference's 1 layer; lr not tuned yet (first ML-100K figures: docs/models.md)
    defaults={"model.layers": 1, "train.lr": 1e-3, "train.windows": "prefixes"},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 1, "model.heads": 4, "model.inner_mult": 2, "model.interests": 3,
        "model.dropout": 0.1, "model.attn_dropout": 0.1, "train.windows": "prefixes",
        "train.lr": 1e-4, "train.weight_decay": 0.1, "train.batch_size": 512,
    }},
    objective="prefix",
    factory="lightsans:LightSANs",
)

SRGNN = ModelSpec(
    name="srgnn",
    summary="gated graph network over the history's session graph, attention readout (Wu et al. 2019)",
    reads=(),  # --layers = gated GNN steps
    # RecBole's 1 step; lr not tuned yet (first ML-100K figures: docs/models.md)
    defaults={"model.layers": 1, "train.lr": 1e-3, "train.windows": "prefixes"},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 2, "model.dropout": 0.0, "train.windows": "prefixes",
        "train.lr": 1e-4, "train.weight_decay": 0.01, "train.batch_size": 512,
    }},
    objective="prefix",
    factory="srgnn:SRGNN",
)

MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (SASREC, GRU4REC, NEXTITNET, LIGHTSANS, SRGNN)}
# Every model-specific setting -> the models that read it.
MODEL_SETTINGS: dict[str, tuple[str, ...]] = {}
for _spec in MODEL_SPECS.values():
    for _name in _spec.reads:
        MODEL_SETTINGS[_name] = MODEL_SETTINGS.get(_name, ()) + (_spec.name,)


def model_spec(name: str) -> ModelSpec:
    from ...errors import PixelrecError

    if name not in MODEL_SPECS:
        raise PixelrecError(f"unknown --model {name!r}; expected one of {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def default_of(key: str) -> dict[str, Any]:
    """{model: default} of one "section.field" key, for the models that declare one."""
    return {name: spec.defaults[key] for name, spec in MODEL_SPECS.items() if key in spec.defaults}
