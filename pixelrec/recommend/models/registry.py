"""The models `pixelrec fit --model` offers (sequential, and the non-sequential MF, FM, DSSM, VBPR, ACF,
VisRank), one `ModelSpec` each (this module does not import torch).

A spec is the one place that says what a model is: the settings it reads beyond the shared ones
(`--dim`, `--max-len`, `--dropout`), its defaults, its `--preset` values, its training
objective and the class that builds it. `recommend.config` derives the command line's choices, the
per-model default texts, the null settings of config.json and the refusal of options a model does
not have from these specs; `models.build_sequence_encoder` builds the class.

Objectives (how training windows are cut, `--windows`):
- ``causal``: the state at a position sees only the items up to it, so one window trains the next
  item at every position (sliding, overlapping or chunks windows; prefixes too).
- ``prefix``: states attend over the whole window, so only its last position may be trained: every
  prefix of a training sequence is one window that trains the item after it (`--windows prefixes`,
  the PixelRec code's AUGSEQ and RecBole's augmentation).
- ``cloze``: states attend over the whole window and some of its items are hidden behind the
  model's mask vector; each hidden slot's state predicts its own item (BERT4Rec). Any item of a
  window may be hidden, so windows are whole sequences or parts of them (`--windows chunks` or
  `overlapping`), not windows cut for next-item targets (`sliding`, `prefixes`).
- ``context`` (FM and DSSM with `--context window`, the PixelRec code's training): every item of a
  window is a target, predicted from the window's other items, before and after it; the same windows
  as cloze. These order-free models still serve the causal state (the last items of a history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

OBJECTIVES = ("causal", "prefix", "cloze", "context")
# Shared settings a model may give its own default in ModelSpec.defaults; every other model takes these.
SHARED_DEFAULTS: dict[str, Any] = {"model.dropout": 0.3, "model.attn_dropout": 0.3}
# Settings every model reads (SequenceConfig fields); the others belong to the models that list them.
SHARED_SETTINGS = ("model", "dim", "max_len", "dropout")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str  # one line for docs and --help
    reads: tuple[str, ...]  # SequenceConfig fields it reads besides SHARED_SETTINGS
    defaults: Mapping[str, Any]  # "model.layers", "train.lr", "train.windows": used when not given
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # preset name -> {"section.field": value}
    objective: str = "causal"
    # "module:Class" under pixelrec.recommend.models, built with the SequenceConfig; the module also
    # defines token_macs(cfg), the model's forward cost per window position (losses.sequence_macs)
    factory: str = ""
    # a learned vector per training user (MF, VBPR): the class is built with the user count too, and
    # histories of other users are folded in (recommend/foldin.py)
    per_user: bool = False
    sequential: bool = True  # False: the user state ignores the order of the history (docs/models.md)
    # False (VisRank): no training and no user or item vectors; `fit` writes a run that evaluate and
    # retrieve rank by brute force (runs/visrank.py), factory and objective unused
    trains: bool = True


# The PixelRec reference's values (westlake-repl/PixelRec code/, PixelNet/<model>.yaml and the README's
# PixelNet training table); tests/test_reference_preset.py cites the file and line of each.
SASREC = ModelSpec(
    name="sasrec",
    summary="self-attentive transformer over the history (Kang & McAuley 2018)",
    reads=("layers", "heads", "attn_dropout", "positions", "norm", "inner_mult"),
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
    reads=("layers", "gru_hidden"),
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
    reads=("layers", "dilations"),
    # layers = repetitions of the --dilations blocks; 1 already sees 30 items back (kernel 3, dilations
    # 1,2,4,8). ML-100K (seed 0, test NDCG@10 / Recall@10; docs/models.md): stride 3 (SASRec's) 0.0927 /
    # 0.1845; stride 1 (a window ends at every item, as RecBole's one sample per prefix) 0.0988 / 0.1962;
    # 3 repetitions (stride 3) 0.0951 / 0.1909; stride 1 with dropout 0.5 0.0999 / 0.1898
    defaults={"model.layers": 1, "train.lr": 1e-3, "train.windows": "sliding", "train.stride": 1},
    presets={"pixelrec": {
        "model.dim": 1024, "model.layers": 3, "model.dilations": "1,4", "model.dropout": 0.0,
        "train.lr": 1e-4, "train.weight_decay": 0.01, "train.batch_size": 64,
    }},
    factory="nextitnet:NextItNet",
)
LIGHTSANS = ModelSpec(
    name="lightsans",
    summary="low-rank self-attention over k latent interests, decoupled positions (Fan et al. 2021)",
    reads=("layers", "heads", "attn_dropout", "inner_mult", "interests"),
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
    reads=("layers",),  # --layers = gated GNN steps
    # RecBole's 1 step; lr not tuned yet (first ML-100K figures: docs/models.md)
    defaults={"model.layers": 1, "train.lr": 1e-3, "train.windows": "prefixes"},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 2, "model.dropout": 0.0, "train.windows": "prefixes",
        "train.lr": 1e-4, "train.weight_decay": 0.01, "train.batch_size": 512,
    }},
    objective="prefix",
    factory="srgnn:SRGNN",
)

BERT4REC = ModelSpec(
    name="bert4rec",
    summary="bidirectional transformer trained by cloze; a mask slot after the history is the user (Sun et al. 2019)",
    reads=("layers", "heads", "attn_dropout", "norm", "inner_mult", "mask_ratio", "mask_last", "bert_head",
           "item_bias"),
    # ML-100K (benchmarks/ml100k.py, docs/models.md): lr 3e-3 reached lr 1e-3's best validation NDCG@10 in
    # half the epochs; mask ratio 0.4, no head and no last-item-only windows were no better (one seed each)
    # ML-100K (seed 0, test NDCG@10): stride 10, lr 3e-3, dropout 0.3 (the earlier defaults) 0.0858; stride 1
    # (a window ends at every item, as RecBole's one sample per prefix) 0.0995; with lr 1e-3 0.1041; with
    # dropout 0.2 / 0.2 (RecBole's) 0.1140 (docs/results.md)
    defaults={"model.layers": 2, "train.lr": 1e-3, "train.windows": "overlapping", "train.stride": 1,
              "model.dropout": 0.2, "model.attn_dropout": 0.2},
    presets={"pixelrec": {
        "model.dim": 512, "model.layers": 2, "model.heads": 4, "model.inner_mult": 1, "model.dropout": 0.1,
        "model.attn_dropout": 0.1, "model.norm": "post", "model.mask_ratio": 0.6, "model.mask_last": 0.0,
        "model.bert_head": False, "train.lr": 1e-4, "train.weight_decay": 0.1, "train.batch_size": 64,
    }},
    objective="cloze",
    factory="bert4rec:BERT4Rec",
)

# Non-sequential models (PixelRec's MF, FM and DSSM columns; VBPR of its ViNet baselines). Their
# `--preset pixelrec` values: the README's hyper-parameter table and the IDNet/PixelNet/ViNet yamls
# (tests/test_reference_preset.py cites them). The reference trains FM and DSSM on chunks whose items
# after the target are context too (non-causal): the preset does (`--context window`); by default
# every position trains its next item from the items before it (causal), as a user vector is served
# (docs/models.md says why).
MF = ModelSpec(
    name="mf",
    summary="matrix factorisation: a learned vector per training user dotted with the item vector (BPR-MF)",
    reads=(),
    # lr 1e-2: on ML-100K (seed 0) the best validation NDCG@10 0.082 at epoch 15; at 1e-3 the user vectors
    # (one update per window of their user) had not caught up after 10 epochs (0.053)
    defaults={"train.lr": 1e-2, "train.windows": "sliding"},
    presets={"pixelrec": {"model.dim": 4096, "train.lr": 1e-4, "train.weight_decay": 0.0,
                          "train.batch_size": 512}},
    factory="mf:MF",
    per_user=True,
    sequential=False,
)
FM = ModelSpec(
    name="fm",
    summary="factorisation machine's pair term: the user is the sum of the last --max-len history item vectors",
    reads=("context",),
    # ML-100K, seed 0: test NDCG@10 0.095 at lr 1e-3, 0.083 at 5e-3 (docs/models.md)
    defaults={"train.lr": 1e-3, "train.windows": "sliding"},
    presets={"pixelrec": {"model.dim": 4096, "model.dropout": 0.0, "model.context": "window", "train.lr": 1e-4,
                          "train.weight_decay": 0.1, "train.batch_size": 64}},
    factory="fm:FM",
    sequential=False,
)
DSSM = ModelSpec(
    name="dssm",
    summary="two-tower DSSM: the user is the mean of the last --max-len history item vectors, optional user MLP",
    reads=("dssm_mlp", "context"),
    # ML-100K, seed 0: best validation NDCG@10 0.098 at lr 5e-3, 0.086 at 1e-3 (the mean's smaller
    # logits learn slower than FM's sum)
    defaults={"train.lr": 5e-3, "train.windows": "sliding"},
    presets={"pixelrec": {"model.dim": 4096, "model.dssm_mlp": "", "model.dropout": 0.0, "model.context": "window",
                          "train.lr": 1e-4, "train.weight_decay": 0.1, "train.batch_size": 64}},
    factory="dssm:DSSM",
    sequential=False,
)
VBPR = ModelSpec(
    name="vbpr",
    summary="VBPR: MF plus the user's visual factors dotted with a learned projection of the item's cached "
            "embedding, plus a visual bias (He & McAuley 2016)",
    reads=(),
    # lr 1e-2 as MF: on ML-100K (seed 0) best validation NDCG@10 0.078 at epoch 18; 0.066 at 1e-3 after 34
    defaults={"train.lr": 1e-2, "train.windows": "sliding"},
    presets={"pixelrec": {"model.dim": 4096, "train.lr": 1e-3, "train.weight_decay": 0.0, "train.encoder_lr": 1e-4,
                          "train.encoder_weight_decay": 0.1, "train.batch_size": 512}},
    factory="vbpr:VBPRUser",
    per_user=True,
    sequential=False,
)

ACF = ModelSpec(
    name="acf",
    summary="ACF: a learned user vector plus item-level attention over the history's item vectors, each "
            "weighted by component-level attention over its cached image tokens (Chen et al. 2017)",
    reads=(),
    # lr 1e-2 as MF (one update of e_u per window of its user)
    defaults={"train.lr": 1e-2, "train.windows": "sliding"},
    # the reference's ViNet/acf.yaml (its README's table says embedding 128, weight decay 0.1, batch 64);
    # profile: the last 10 items
    presets={"pixelrec": {"model.dim": 512, "model.max_len": 10, "train.lr": 1e-4, "train.weight_decay": 0.01,
                          "train.batch_size": 512}},
    factory="acf:ACF",
    per_user=True,
    sequential=False,
)
VISRANK = ModelSpec(
    name="visrank",
    summary="VisRank, no training: an item's score is the mean of its --visrank-k largest cosine similarities "
            "to the cached embeddings of the last --max-len history items",
    reads=("visrank_k",),
    defaults={"train.lr": 0.0, "train.windows": "sliding"},  # nothing trains
    presets={"pixelrec": {"model.max_len": 50, "model.visrank_k": 1}},  # ViNet/visrank.py: last 50, top_num 1
    sequential=False,
    trains=False,
)

MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (SASREC, GRU4REC, NEXTITNET, LIGHTSANS, SRGNN,
                                                                  BERT4REC, MF, FM, DSSM, VBPR, ACF, VISRANK)}
# Models that read `--cache` whatever the item tower (ACF: every item's cached tokens; VisRank: embeddings)
CACHE_MODELS = ("acf", "visrank")
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
