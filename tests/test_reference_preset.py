"""`--preset pixelrec` against the PixelRec reference code (westlake-repl/PixelRec, directory code/).

The reference runs `python main.py --device 0,1,2,3 --config_file PixelNet/sasrec.yaml overall/ViT.yaml`
(README.md, "Run Baselines"), i.e. torchrun over four GPUs. Each row below is one setting: the
FitConfig key, the value the preset must produce, and where the reference sets it (file:line).
Then behaviour tests of what the settings do: post-LN blocks, AdamW groups, the negative pool, the
loss average, fp32 caches, QuickGELU checkpoints, early-stopping ties and the preset's checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fixtures_runs import (OPENAI_SCALARS, default_settings_cache, handmade_dataset, openai_layout_checkpoint,
                           session_root, synth_dataset, tiny_config)
from pixelrec import runtime
from pixelrec.cli import ENCODE_PIXELREC_PRESET, cli
from pixelrec.data.sequences import load_sequences
from pixelrec.encode.cache import open_cache
from pixelrec.encode.encoder import PIXELREC_MEAN_STD, EncoderConfig, build_encoder
from pixelrec.errors import PixelrecError
from pixelrec.recommend import preset_check
from pixelrec.recommend.batches import sample_negatives, training_windows, window_bounds
from pixelrec.recommend.build import build_optimizer, build_recommender
from pixelrec.recommend.config import (MODEL_SPECS, PRECISIONS, FitConfig, SequenceConfig, TrainConfig,
                                       apply_preset, preset_values)
from pixelrec.recommend.sequence import SASRec, Block
from pixelrec.runs.fit import fit

# ------------------------------------------------------------------------------ the settings
# (FitConfig key, value under the preset, reference file:line)
FIT_ROWS = [
    ("model.layers", 2, "PixelNet/sasrec.yaml:2 n_layers: 2"),
    ("model.heads", 4, "PixelNet/sasrec.yaml:3 n_heads: 4"),
    ("model.dim", 512, "PixelNet/sasrec.yaml:4 embedding_size: 512"),
    ("model.inner_mult", 2, "PixelNet/sasrec.yaml:5 inner_size: 2 (times embedding_size, mosasrec.py:20)"),
    ("model.dropout", 0.1, "PixelNet/sasrec.yaml:6 hidden_dropout_prob: 0.1"),
    ("model.attn_dropout", 0.1, "PixelNet/sasrec.yaml:7 attn_dropout_prob: 0.1"),
    ("model.norm", "post", "PixelNet/sasrec.yaml:9 layer_norm_eps: 1e-12; REC/model/layers.py:615,671 "
                           "LayerNorm(hidden + input), no final LayerNorm (layers.py:752-759)"),
    ("model.positions", "absolute", "REC/model/PixelNet/mosasrec.py:35,78-81 learned position embedding"),
    ("model.max_len", 10, "overall/ViT.yaml:11 MAX_ITEM_LIST_LENGTH: 10"),
    ("train.windows", "chunks", "REC/data/dataload.py:103-150 non-overlapping chunks of max_len + 1, oldest "
                                "len % 11 dropped"),
    ("train.batch_size", 64, "overall/ViT.yaml:24 train_batch_size: 16 per GPU x 4 GPUs (README.md "
                             "'on four cards'; README table: B [64])"),
    ("train.lr", 1e-4, "overall/ViT.yaml:35 rec_lr: 0.0001"),
    ("train.weight_decay", 0.1, "overall/ViT.yaml:37 rec_decay: 0.1"),
    ("train.encoder_lr", 1e-4, "overall/ViT.yaml:34 modal_lr: 0.0001"),
    ("train.encoder_weight_decay", 0.0, "overall/ViT.yaml:36 modal_decay: 0"),
    ("train.decay_groups", "pixelrec", "REC/trainer/trainer.py:74-96 'visual_encoder' in name -> modal group, "
                                       "everything else rec group, no exemptions"),
    ("train.patience", 31, "overall/ViT.yaml:48 stopping_step: 30; REC/utils/utils.py:95 stops when "
                           "cur_step > max_step, i.e. on the 31st epoch without a gain"),
    ("train.ties", "later", "REC/utils/utils.py:89 value >= best counts as a gain"),
    ("train.precision", "fp32", "run.py:37-58, REC/trainer/trainer.py:116-125: no autocast, plain backward"),
    ("loss.loss", "bpr", "REC/model/PixelNet/mosasrec.py:89-92 -log sigmoid(pos - neg)"),
    ("loss.mean_over", "sequences", "REC/model/PixelNet/mosasrec.py:92-93 .sum(-1) over positions, "
                                    ".mean(-1) over sequences"),
    ("loss.negatives_from", "all", "REC/data/dataset/trainset.py:113-117 randint(1, item_num - 1), item_num "
                                   "= every item of the CSV (REC/data/dataload.py:57)"),
    ("items.encoder", "ViT-B-32-quickgelu", "overall/ViT.yaml:17 clip-vit-base-patch32 (OpenAI's weights, "
                                            "QuickGELU); REC/model/load.py:94"),
    ("items.tune_blocks", 2, "overall/ViT.yaml:26 tune_scale: 165 = the 5 embedding parameters + 10 blocks "
                             "x 16 frozen (REC/model/load.py:97-99): blocks 10-11 trained"),
    ("items.head", "token_relu_mean", "overall/ViT.yaml:28,30 activation relu, method mean; "
                                      "REC/model/layers.py:121-128 mean_t ReLU(Linear(h_t)), post_layernorm "
                                      "removed (REC/model/load.py:115-117)"),
]

# The other models' own values (their ModelSpec presets, models/registry.py): PixelNet/<model>.yaml for
# the architecture, the README's PixelNet table (else its IDNet table) for lr / batch / weight decay.
# Where README and yaml disagree the yaml wins (docs/reproducing-pixelrec.md lists the disagreements).
MODEL_ROWS = {
    "gru4rec": [
        ("model.dim", 512, "PixelNet/gru4rec.yaml:3 embedding_size: 512 (README IDNet table: 2048, IDNet yaml)"),
        ("model.layers", 1, "PixelNet/gru4rec.yaml:2 num_layers: 1"),
        ("model.gru_hidden", 512, "PixelNet/gru4rec.yaml:4 hidden_size: 1 (times embedding_size; README: inner size [2])"),
        ("model.dropout", 0.0, "PixelNet/gru4rec.yaml:5 dropout_prob: 0"),
        ("train.lr", 1e-4, "README.md IDNet table, GRU4Rec row: γ [0.0001] (no PixelNet row)"),
        ("train.batch_size", 64, "README.md IDNet table, GRU4Rec row: B [64]"),
        ("train.weight_decay", 0.01, "README.md IDNet table, GRU4Rec row: β [0.01]"),
    ],
    "nextitnet": [
        ("model.dim", 1024, "PixelNet/nextitnet.yaml:2 embedding_size: 1024"),
        ("model.layers", 3, "PixelNet/nextitnet.yaml:4 block_num: 3 (README: block number [3])"),
        ("model.dilations", "1,4", "PixelNet/nextitnet.yaml:5 dilations: [1,4] (kernel_size: 3, line 3, is fixed)"),
        ("model.dropout", 0.0, "PixelNet/nextitnet.yaml: no dropout key; REC/model/IDNet/nextitnet.py:31-77 no "
                               "dropout layer"),
        ("train.lr", 1e-4, "README.md PixelNet table, NextItNet row: γ [0.0001] (IDNet row: 0.0005)"),
        ("train.batch_size", 64, "README.md PixelNet table, NextItNet row: B [64]"),
        ("train.weight_decay", 0.01, "README.md PixelNet table, NextItNet row: β [0.01]"),
    ],
    "lightsans": [
        ("model.layers", 1, "PixelNet/lightsans.yaml:2 n_layers: 1"),
        ("model.heads", 4, "PixelNet/lightsans.yaml:3 n_heads: 4"),
        ("model.dim", 512, "PixelNet/lightsans.yaml:4 embedding_size: 512"),
        ("model.inner_mult", 2, "PixelNet/lightsans.yaml:5 inner_size: 2 (times embedding_size)"),
        ("model.interests", 3, "PixelNet/lightsans.yaml:6 k_interests: 3"),
        ("model.dropout", 0.1, "PixelNet/lightsans.yaml:7 hidden_dropout_prob: 0.1"),
        ("model.attn_dropout", 0.1, "PixelNet/lightsans.yaml:8 attn_dropout_prob: 0.1"),
        ("train.windows", "prefixes", "REC/data/dataload.py:152-203 AUGSEQ: every prefix -> its next item "
                                      "(REC/data/dataset/trainset.py:256-290)"),
        ("train.lr", 1e-4, "README.md PixelNet table, LightSANs row: γ [0.0001]"),
        ("train.batch_size", 512, "README.md PixelNet table, LightSANs row: B [512]"),
        ("train.weight_decay", 0.1, "README.md PixelNet table, LightSANs row: β [0.1]"),
    ],
    "srgnn": [
        ("model.dim", 512, "PixelNet/srgnn.yaml:2 embedding_size: 512"),
        ("model.layers", 2, "PixelNet/srgnn.yaml:3 step: 2 (gated GNN steps)"),
        ("model.dropout", 0.0, "PixelNet/srgnn.yaml: no dropout key; REC/model/IDNet/srgnn.py:9-113 no dropout layer"),
        ("train.windows", "prefixes", "REC/model/IDNet/srgnn.py:10 input_type = InputType.AUGSEQ: every prefix -> "
                                      "its next item (REC/data/dataset/trainset.py:939-981)"),
        ("train.lr", 1e-4, "README.md PixelNet table, SRGNN row: γ [0.0001] (IDNet row: 0.00005)"),
        ("train.batch_size", 512, "README.md PixelNet table, SRGNN row: B [512] (IDNet row: 64)"),
        ("train.weight_decay", 0.01, "README.md PixelNet table, SRGNN row: β [0.01]"),
    ],
    "bert4rec": [
        ("model.layers", 2, "PixelNet/bert4rec.yaml:2 n_layers: 2"),
        ("model.heads", 4, "PixelNet/bert4rec.yaml:3 n_heads: 4"),
        ("model.dim", 512, "PixelNet/bert4rec.yaml:4 embedding_size: 512"),
        ("model.inner_mult", 1, "PixelNet/bert4rec.yaml:5 inner_size: 1 (times embedding_size, "
                                "REC/model/PixelNet/mobert4rec.py:18)"),
        ("model.dropout", 0.1, "PixelNet/bert4rec.yaml:6 hidden_dropout_prob: 0.1"),
        ("model.attn_dropout", 0.1, "PixelNet/bert4rec.yaml:7 attn_dropout_prob: 0.1"),
        ("model.norm", "post", "PixelNet/bert4rec.yaml:9 layer_norm_eps: 1e-12; REC/model/layers.py:615,671 "
                               "LayerNorm(hidden + input) (the TransformerEncoder SASRec uses)"),
        ("model.mask_ratio", 0.6, "PixelNet/bert4rec.yaml:11 mask_ratio: 0.6"),
        ("model.mask_last", 0.0, "REC/data/dataset/trainset.py:418-479 BERT4RecTrainDataset masks positions "
                                 "at random only: no last-item-only samples"),
        ("model.bert_head", False, "REC/model/PixelNet/mobert4rec.py:101-109 the transformer's output at the "
                                   "masked positions is scored directly (BPR), no output head"),
        ("train.lr", 1e-4, "README.md PixelNet table, BERT4Rec row: γ [0.0001] (IDNet row: 0.00005)"),
        ("train.batch_size", 64, "README.md PixelNet table, BERT4Rec row: B [64]"),
        ("train.weight_decay", 0.1, "README.md PixelNet table, BERT4Rec row: β [0.1]"),
    ],
}
# The non-sequential models (docs/models.md): the README's hyper-parameter table and the model yamls as
# ../shared/reference/pixelrec-models.md section 2 gathers them; the PixelNet lr / weight decay / batch of FM
# and DSSM are overall/ViT.yaml's (the README has no PixelNet row for them).
MODEL_ROWS.update({
    "mf": [
        ("model.dim", 4096, "IDNet/mf.yaml embedding_size: 4096 (PixelNet/momf.yaml: 4096); mlp_hidden_size: [] "
                            "= no tower MLP (REC/model/IDNet/mf.py:52-62 score = <e_u, e_i>)"),
        ("train.lr", 1e-4, "README.md IDNet table, MF row: γ [0.0001]"),
        ("train.batch_size", 512, "README.md IDNet table, MF row: B [512]"),
        ("train.weight_decay", 0.0, "README.md IDNet table, MF row: β [0]"),
    ],
    "fm": [
        ("model.dim", 4096, "PixelNet/mofm.yaml embedding_size: 4096 (README; IDNet/fm.yaml: 2048)"),
        ("model.dropout", 0.0, "IDNet/fm.yaml dropout_prob: 0"),
        ("model.context", "window", "REC/data/dataset/trainset.py:374-413 SampleOneTowerTrainDataset: each item of "
                                    "an 11-item chunk is the target, the chunk's other items (before and after) the fields"),
        ("train.lr", 1e-4, "overall/ViT.yaml:35 rec_lr: 0.0001 (README IDNet table, FM row: 5e-5)"),
        ("train.batch_size", 64, "overall/ViT.yaml:24 train_batch_size: 16 per GPU x 4 GPUs"),
        ("train.weight_decay", 0.1, "overall/ViT.yaml:37 rec_decay: 0.1 (README IDNet table, FM row: 0)"),
    ],
    "dssm": [
        ("model.dim", 4096, "IDNet/dssm.yaml and PixelNet/modssm.yaml embedding_size: 4096"),
        ("model.dssm_mlp", "", "IDNet/dssm.yaml mlp_hidden_size: [] (no tower MLP; REC/model/IDNet/dssm.py:46-69)"),
        ("model.dropout", 0.0, "IDNet/dssm.yaml dropout_prob: 0"),
        ("model.context", "window", "REC/data/dataset/trainset.py:294-332 SampleTwoTowerTrainDataset: the user "
                                    "tower averages the chunk minus the target, items after it included"),
        ("train.lr", 1e-4, "overall/ViT.yaml:35 rec_lr: 0.0001 (README IDNet table, DSSM row: 0.0001)"),
        ("train.batch_size", 64, "overall/ViT.yaml:24 16 per GPU x 4 GPUs (README IDNet table, DSSM row: B [64])"),
        ("train.weight_decay", 0.1, "overall/ViT.yaml:37 rec_decay: 0.1 (README IDNet table, DSSM row: 0)"),
    ],
    "vbpr": [
        ("model.dim", 4096, "ViNet/vbpr.yaml embedding_size: 4096 = 2048 id factors + 2048 visual factors "
                            "(REC/model/ViNet/vbpr.py:55-70)"),
        ("train.lr", 1e-3, "README.md ViNet table, VBPR row and vbpr.yaml: id parameters γ [0.001]"),
        ("train.weight_decay", 0.0, "README.md ViNet table, VBPR row: id parameters β [0]"),
        ("train.encoder_lr", 1e-4, "vbpr.yaml: parameters named 'projection' (E, beta') at lr 0.0001"),
        ("train.encoder_weight_decay", 0.1, "vbpr.yaml: 'projection' parameters at weight decay 0.1"),
        ("train.batch_size", 512, "ViNet/vbpr.yaml train_batch_size: 512"),
    ],
    "acf": [
        ("model.dim", 512, "ViNet/acf.yaml embedding_size: 512 (README ViNet table, ACF row: 128)"),
        ("model.max_len", 10, "ACFEvalDataset (REC/data/dataset/evalset.py:148-183): the last 10 items + the user id"),
        ("train.lr", 1e-4, "ViNet/acf.yaml and README ViNet table, ACF row: γ [0.0001]"),
        ("train.weight_decay", 0.01, "ViNet/acf.yaml weight_decay: 0.01 (README ViNet table, ACF row: β 0.1)"),
        ("train.batch_size", 512, "ViNet/acf.yaml train_batch_size: 512 (README ViNet table, ACF row: 64)"),
    ],
    "visrank": [
        ("model.max_len", 50, "VisRankEvalDataset (REC/data/dataset/evalset.py:113-145): the last 50 items"),
        ("model.visrank_k", 1, "REC/model/ViNet/visrank.py:37-55 top_num 1: the largest similarity"),
    ],
})
MODEL_ROW_CASES = [(m, *row) for m, rows in MODEL_ROWS.items() for row in rows]

# What `encode --preset pixelrec` applies (cli.ENCODE_PIXELREC_PRESET), with the reference's source.
ENCODE_ROWS = [
    ("encoder", "ViT-B-32-quickgelu", "overall/ViT.yaml:17-18 clip-vit-base-patch32 from transformers (QuickGELU)"),
    ("pooling", "mean", "overall/ViT.yaml:30 method: mean over all tokens (REC/model/layers.py:125-128)"),
    ("split_block", 2, "overall/ViT.yaml:26 tune_scale: 165: the last 2 blocks are trained"),
    ("float32", True, "no half precision anywhere in the reference: tokens are cached as float32"),
    ("precision", "fp32", "run.py:37-58: the encoder runs in float32"),
]


@pytest.mark.parametrize("key, value, source", FIT_ROWS, ids=[r[0] for r in FIT_ROWS])
def test_fit_preset_setting(key, value, source):
    cfg = apply_preset(FitConfig(interactions="i.csv", out="o"), "pixelrec")
    assert cfg.get(key) == value, f"{key}: reference {source}"


@pytest.mark.parametrize("model, key, value, source", MODEL_ROW_CASES, ids=[f"{r[0]}-{r[1]}" for r in MODEL_ROW_CASES])
def test_fit_preset_setting_of_each_model(model, key, value, source):
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = model
    if model in ("vbpr", "visrank"):  # read the frozen cached embeddings
        cfg.items.kind, cfg.items.cache = "frozen", "c.h5"
    if model == "acf":  # reads the cache whatever the tower
        cfg.items.cache = "c.h5"
    cfg = apply_preset(cfg, "pixelrec").validate()
    assert cfg.get(key) == value, f"{model} {key}: reference {source}"


def test_every_preset_setting_has_a_row():
    assert {k for k, _, _ in FIT_ROWS} == set(preset_values("pixelrec", "sasrec"))
    for model, rows in MODEL_ROWS.items():
        assert {k for k, _, _ in rows} == set(MODEL_SPECS[model].presets["pixelrec"]), model
    assert set(MODEL_ROWS) | {"sasrec"} == set(MODEL_SPECS)
    assert {k for k, _, _ in ENCODE_ROWS} == set(ENCODE_PIXELREC_PRESET)


@pytest.mark.parametrize("key, value, source", ENCODE_ROWS, ids=[r[0] for r in ENCODE_ROWS])
def test_encode_preset_setting(key, value, source):
    assert ENCODE_PIXELREC_PRESET[key] == value, f"{key}: reference {source}"


def test_preset_preprocessing_is_the_references():
    # REC/data/dataset/trainset.py:17-19,103-108: Resize((224, 224)) (bilinear), ToTensor, Normalize(0.5, 0.5)
    enc = build_encoder(EncoderConfig(model="pixelrec-tiny-vit-quickgelu", preset="pixelrec"))
    pre = enc.preprocess_cfg
    assert PIXELREC_MEAN_STD == (0.5, 0.5, 0.5)
    assert (pre["mean"], pre["std"], pre["resize_mode"], pre["interpolation"]) == (
        [0.5] * 3, [0.5] * 3, "squash", "bilinear")


def test_options_given_win_over_the_preset():
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.norm = "pre"
    apply_preset(cfg, "pixelrec", explicit={"model.norm"})
    assert cfg.model.norm == "pre" and cfg.train.precision == "fp32"


def test_precision_choices_are_the_runtimes():
    assert PRECISIONS == runtime.PRECISIONS


def test_defaults_stay_ours():
    cfg = FitConfig(interactions="i.csv", out="o")
    assert (cfg.model.norm, cfg.loss.negatives_from, cfg.loss.mean_over, cfg.train.precision,
            cfg.train.decay_groups, cfg.train.ties) == ("pre", "train", "positions", "auto", "standard", "earlier")


def test_old_config_json_loads_as_it_ran():
    """A config.json written before these settings existed (with `amp`) means what it meant then."""
    old = {"interactions": "i.csv", "out": "o", "model": {"dim": 8}, "train": {"amp": False, "lr": 1e-3}}
    cfg = FitConfig.from_dict(old)
    assert (cfg.model.norm, cfg.train.precision, cfg.loss.negatives_from, cfg.loss.mean_over,
            cfg.train.decay_groups, cfg.train.ties) == ("pre", "fp32", "train", "positions", "standard", "earlier")
    assert FitConfig.from_dict({**old, "train": {"amp": True}}).train.precision == "auto"
    assert not hasattr(TrainConfig(), "amp")


# ------------------------------------------------------------------------------ post-LN SASRec
def _layer_norm(z: torch.Tensor, ln: torch.nn.LayerNorm, eps: float) -> torch.Tensor:
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * ln.weight + ln.bias


def test_post_ln_block_is_layernorm_of_x_plus_sublayer():
    torch.manual_seed(0)
    cfg = SequenceConfig(dim=8, heads=2, max_len=5, layers=1, dropout=0.0, attn_dropout=0.0, norm="post", inner_mult=2)
    block = Block(cfg).eval()
    for ln in (block.ln1, block.ln2):  # not the identity LayerNorm, so a misplaced one shows
        torch.nn.init.normal_(ln.weight, 1.0, 0.3)
        torch.nn.init.normal_(ln.bias, 0.0, 0.3)
    assert block.ln1.eps == block.ln2.eps == 1e-12
    B, L, d, h = 2, 5, 8, 2
    x = torch.randn(B, L, d)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    # by hand: causal multi-head attention, then LayerNorm(x + attn), then LayerNorm(h + MLP(h))
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (t.reshape(B, L, h, d // h).transpose(1, 2) for t in qkv.split(d, -1))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d // h)).masked_fill(~causal, float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
    att = att @ block.attn.proj.weight.T + block.attn.proj.bias
    hidden = _layer_norm(x + att, block.ln1, 1e-12)
    fc1, fc2 = block.mlp[0], block.mlp[2]
    z = hidden @ fc1.weight.T + fc1.bias
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # the erf GELU of REC/model/layers.py:660
    expected = _layer_norm(hidden + z @ fc2.weight.T + fc2.bias, block.ln2, 1e-12)
    got = block(x, causal[None, None].expand(B, 1, L, L))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_post_ln_sasrec_has_no_final_layernorm_and_pre_is_unchanged():
    post = SASRec(SequenceConfig(dim=8, heads=2, max_len=4, layers=1, norm="post", dropout=0.3, attn_dropout=0.3))
    pre = SASRec(SequenceConfig(dim=8, heads=2, max_len=4, layers=1, dropout=0.3, attn_dropout=0.3))
    assert isinstance(post.ln_out, torch.nn.Identity) and post.ln_in.eps == 1e-12
    assert isinstance(pre.ln_out, torch.nn.LayerNorm) and pre.ln_in.eps == 1e-5 and pre.blocks[0].ln1.eps == 1e-5
    # post blocks put their output through a LayerNorm: unit variance per position (weights 1, bias 0)
    post.eval()
    out = post(torch.randn(3, 4, 8) * 5, torch.ones(3, 4, dtype=torch.bool))
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, 4), atol=1e-4)


# ------------------------------------------------------------------------------ data and losses
def test_one_item_sequences_are_kept_as_windows_that_train_nothing():
    # REC/data/dataload.py:135-137: a sequence of <= max_len + 1 items is one training sequence, even of 1 item
    assert window_bounds(1, 10, "chunks", 10) == []
    assert window_bounds(1, 10, "chunks", 10, keep_single=True) == [(0, 1, 0)]
    assert window_bounds(25, 10, "chunks", 10, keep_single=True) == [(3, 14, 10), (14, 25, 10)]  # oldest 3 dropped


def _id_model(**loss):
    data = load_sequences(str(handmade_dataset().path), 3)
    cfg = tiny_config(handmade_dataset().path, "unused", loss="bpr")
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    cfg.validate()
    torch.manual_seed(0)
    return build_recommender(cfg, data), data, cfg


def test_negatives_from_all_can_draw_an_item_seen_only_in_valid_or_test():
    model_all, data, _ = _id_model(negatives_from="all")
    model_train, _, _ = _id_model()
    unseen = torch.nonzero(torch.from_numpy(data.train_counts) == 0).flatten()
    unseen = unseen[unseen > 0]
    assert len(unseen) > 0, "the handmade data has items without training interactions"
    seq = torch.zeros(64, 4, dtype=torch.long)
    seq[:, -1] = int(model_all.known_items[0])
    gen = torch.Generator().manual_seed(0)
    drawn_all = sample_negatives(seq, model_all.known_items, gen).unique()
    drawn_train = sample_negatives(seq, model_train.known_items, gen).unique()
    assert bool(torch.isin(unseen, drawn_all).any())
    assert not bool(torch.isin(unseen, drawn_train).any())
    assert len(model_all.known_items) == data.num_items  # every catalogue item, padding excluded


def test_loss_summed_over_positions_and_averaged_over_sequences():
    model, data, _ = _id_model(mean_over="sequences")
    model.eval()
    a, b, c = (int(i) for i in model.known_items[:3])
    seq = torch.tensor([[0, a, b, c], [0, 0, b, a], [0, 0, 0, c]])  # windows with 2, 1 and 0 targets
    neg = torch.tensor([[c, c, a], [c, c, c], [a, a, a]])
    loss = model.recommendation_loss(seq, neg)
    vecs = model.tower(torch.arange(data.num_items + 1))
    states = model.states(vecs[seq[:, :-1]], seq[:, :-1])
    per_pos = -F.logsigmoid((states * vecs[seq[:, 1:]]).sum(-1) - (states * vecs[neg]).sum(-1))
    mask = (seq[:, :-1] != 0) & (seq[:, 1:] != 0)
    expected = (per_pos * mask).sum() / 3  # the one-item window counts among the 3 sequences
    assert mask.sum() == 3 and torch.allclose(loss, expected, atol=1e-6)
    positions, _, _ = _id_model()
    positions.load_state_dict(model.state_dict())
    positions.eval()
    assert torch.allclose(positions.recommendation_loss(seq, neg), (per_pos * mask).sum() / 3, atol=1e-6)
    # 3 positions and 3 sequences here: equal by construction; with a two-item sequence dropped they differ
    two = seq[:2]
    assert torch.allclose(model.recommendation_loss(two, neg[:2]), (per_pos[:2] * mask[:2]).sum() / 2, atol=1e-6)
    assert torch.allclose(positions.recommendation_loss(two, neg[:2]), (per_pos[:2] * mask[:2]).sum() / 3, atol=1e-6)


def test_training_windows_keep_one_item_users_only_when_averaging_over_sequences(tmp_path):
    csv = tmp_path / "i.csv"
    csv.write_text("item_id,user_id,timestamp\n" + "".join(f"i{j},u1,{j}\n" for j in range(3))
                   + "".join(f"i{j},u2,{j}\n" for j in range(6)))
    data = load_sequences(str(csv), 3)
    assert len(training_windows(data, 10, "chunks", 10)) == 1
    kept = training_windows(data, 10, "chunks", 10, keep_single=True)
    assert sorted(kept.trained.tolist()) == [0, 3]


# ------------------------------------------------------------------------------ AdamW groups
@pytest.fixture(scope="module")
def preset_cache():
    """`pixelrec encode --preset pixelrec` of the synth covers with the tiny QuickGELU ViT (4 blocks)."""
    out = session_root() / "preset-cache.h5"
    if not out.exists():
        r = CliRunner().invoke(cli, ["encode", "--preset", "pixelrec", "--images", str(synth_dataset().covers),
                                     "--out", str(out), "--encoder", "pixelrec-tiny-vit-quickgelu", "--device", "cpu",
                                     "--workers", "0"])
        assert r.exit_code == 0, r.output
        preset_cache_output.text = r.output
    return out


def _preset_partial(cache, out="unused") -> FitConfig:
    cfg = FitConfig(interactions=str(synth_dataset().interactions), out=str(out))
    cfg.items.kind, cfg.items.cache = "partial", str(cache)
    apply_preset(cfg, "pixelrec")
    cfg.model.dim, cfg.train.device, cfg.train.epochs = 16, "cpu", 1
    return cfg.validate()


def test_pixelrec_groups_put_the_image_tower_at_the_encoder_settings_and_decay_everything_else(preset_cache):
    cfg = _preset_partial(preset_cache)
    model = build_recommender(cfg, load_sequences(cfg.interactions, 3))
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert set(groups) == {"recommender", "image_tower"}
    image = {id(p) for p in groups["image_tower"]["params"]}
    # the reference's `visual_encoder`: the tuned ViT blocks and the rec_fc head (REC/model/layers.py:74-80)
    assert image == {id(p) for p in model.tower.top.parameters()} | {id(p) for p in model.tower.head.parameters()}
    assert (groups["image_tower"]["lr"], groups["image_tower"]["weight_decay"]) == (1e-4, 0.0)
    rec = {id(p) for p in groups["recommender"]["params"]}
    assert rec == {id(p) for p in model.encoder.parameters()}
    named = dict(model.encoder.named_parameters())
    for name in ("pos.weight", "ln_in.weight", "ln_in.bias", "blocks.0.ln1.weight", "blocks.0.attn.qkv.bias"):
        assert id(named[name]) in rec  # LayerNorms, biases and position embeddings decay too
    assert (groups["recommender"]["lr"], groups["recommender"]["weight_decay"]) == (1e-4, 0.1)


def test_pixelrec_groups_decay_id_embeddings_and_the_default_grouping_does_not():
    model, _, cfg = _id_model()
    cfg.train.weight_decay = 0.1
    standard = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    emb = id(model.tower.embedding.weight)
    assert emb in {id(p) for p in standard["no_decay"]["params"]} and standard["no_decay"]["weight_decay"] == 0.0
    cfg.train.decay_groups = "pixelrec"
    groups = build_optimizer(model, cfg).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}


# ------------------------------------------------------------------------------ fp32 end to end
def test_preset_encode_prints_its_settings_and_stores_fp32_tokens(preset_cache):
    text = preset_cache_output.text or _reencode_output(preset_cache)
    for flag in ("--encoder pixelrec-tiny-vit-quickgelu (given)", "--pooling mean", "--split-block 2", "--float32",
                 "--precision fp32", "mean = std = 0.5"):
        assert flag in text, text
    assert "warning: --preset pixelrec with --pretrained none" in text
    cache = open_cache(preset_cache)
    assert cache.attrs["precision"] == "fp32" and cache.embedding_dtype == np.float32
    assert preset_check.preset_cache_differences(dict(cache.attrs), "partial", 2) == []
    tokens = cache.read_tokens(np.arange(3))
    assert tokens.dtype == np.float32
    # the stored tokens are the float32 activations, not float16-rounded ones
    assert not np.array_equal(tokens, tokens.astype(np.float16).astype(np.float32))


class preset_cache_output:  # noqa: N801 - the CLI output of the module fixture, when it ran in this process
    text = None


def _reencode_output(cache) -> str:
    """Run the same preset encode again (already complete: it only prints the settings)."""
    r = CliRunner().invoke(cli, ["encode", "--preset", "pixelrec", "--images", str(synth_dataset().covers),
                                 "--out", str(cache), "--encoder", "pixelrec-tiny-vit-quickgelu", "--device", "cpu",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    return r.output


def test_precision_fp32_keeps_fp32_tensors(preset_cache):
    cfg = _preset_partial(preset_cache)
    assert runtime.autocast_dtype(torch.device("cuda"), cfg.train.precision) is None  # no autocast on CUDA either
    assert runtime.autocast_dtype(torch.device("cuda"), "fp16") == torch.float16
    model = build_recommender(cfg, load_sequences(cfg.interactions, 3))
    tower = model.tower
    assert tower.tokens is None or tower.tokens.dtype == torch.float32
    idx = torch.arange(1, 5)
    got = tower.read_tokens(idx)
    stored = torch.from_numpy(open_cache(preset_cache).read_tokens(tower.rows[idx].numpy()))
    assert got.dtype == torch.float32 and torch.equal(got, stored)
    with runtime.autocast_for(torch.device("cpu"), cfg.train.precision):
        assert tower(idx).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------ QuickGELU
def test_openai_layout_checkpoint_is_refused_for_a_gelu_tower():
    path = openai_layout_checkpoint()
    with pytest.raises(PixelrecError, match="QuickGELU.*--encoder pixelrec-tiny-vit-quickgelu"):
        build_encoder(EncoderConfig(model="pixelrec-tiny-vit", pretrained=str(path)))


def test_openai_layout_checkpoint_loads_exactly_into_the_quickgelu_tower():
    import open_clip

    enc = build_encoder(EncoderConfig(model="pixelrec-tiny-vit-quickgelu", pretrained=str(openai_layout_checkpoint())))
    state = torch.load(openai_layout_checkpoint(), weights_only=True)
    for key, value in enc.visual.state_dict().items():
        assert torch.equal(value, state[f"visual.{key}"]), key
    acts = {type(m) for m in enc.visual.modules()}
    assert open_clip.transformer.QuickGELU in acts and torch.nn.GELU not in acts


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace's deprecation notice
def test_openai_torchscript_archive_is_recognised(tmp_path):
    import open_clip

    torch.manual_seed(3)
    clip = open_clip.create_model("pixelrec-tiny-vit-quickgelu").eval()

    class Scripted(torch.nn.Module):  # the full CLIP's parameters and OpenAI's scalars, as OpenAI's JIT files hold
        def __init__(self):
            super().__init__()
            for name, child in clip.named_children():
                setattr(self, name, child)
            for name, p in clip.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for name, v in OPENAI_SCALARS.items():
                self.register_buffer(name, torch.tensor(v))

        def forward(self, x):
            return x * self.logit_scale

    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(Scripted(), torch.ones(1), check_trace=False).save(str(path))
    with pytest.raises(PixelrecError, match="QuickGELU"):
        build_encoder(EncoderConfig(model="pixelrec-tiny-vit", pretrained=str(path)))
    enc = build_encoder(EncoderConfig(model="pixelrec-tiny-vit-quickgelu", pretrained=str(path)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.visual(x), clip.visual(x))


def test_gelu_checkpoint_without_openai_marks_loads_into_a_gelu_tower(tmp_path):
    import open_clip

    path = tmp_path / "gelu.pt"
    torch.save(open_clip.create_model("pixelrec-tiny-vit").state_dict(), path)
    assert build_encoder(EncoderConfig(model="pixelrec-tiny-vit", pretrained=str(path))).dim > 0


# ------------------------------------------------------------------------------ early stopping
@pytest.mark.parametrize("ties, best", [("earlier", 0), ("later", 2)])
def test_ties_keep_the_earlier_or_the_later_epoch(tmp_path, ties, best):
    cfg = tiny_config(handmade_dataset().path, tmp_path / "run", epochs=3, patience=3, lr=0.0)
    cfg.train.ties = ties
    result = fit(cfg)  # lr 0: every epoch scores exactly the same
    scores = {r["valid_ndcg@10"] for r in _history(result.run_dir)}
    assert len(scores) == 1 and result.epochs_run == 3 and result.best_epoch == best


def _history(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ the preset's checks
def test_preset_refuses_a_cache_of_other_settings_naming_each_one():
    cfg = FitConfig(interactions=str(synth_dataset().interactions), out="unused")
    cfg.items.kind, cfg.items.cache = "partial", str(default_settings_cache())
    apply_preset(cfg, "pixelrec")
    with pytest.raises(PixelrecError) as info:
        preset_check.check_preset_inputs(cfg)
    msg = str(info.value)
    for part in ("preprocessing default (the preset wants pixelrec)", "pooling model (the preset wants mean)",
                 "stored values float16 (the preset wants float32)", "ViT blocks GELU (the preset wants QuickGELU)",
                 "split block 1 (the preset wants 2)",
                 "pixelrec encode --preset pixelrec --images COVERS --out CACHE.h5 --encoder pixelrec-tiny-vit-quickgelu"):
        assert part in msg, msg
    assert "\n" not in msg
    cfg.items.kind = "frozen"  # frozen reads pooled embeddings only: the split does not matter
    with pytest.raises(PixelrecError) as info:
        preset_check.check_preset_inputs(cfg)
    assert "split block" not in str(info.value) and "pooling model" in str(info.value)


def test_preset_run_on_a_matching_cache_warns_about_random_weights(preset_cache, tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(preset_check, "log", lines.append)
    cfg = _preset_partial(preset_cache, tmp_path / "run")
    result = fit(cfg)
    assert lines == [preset_check.RANDOM_WEIGHTS_WARNING] and result.epochs_run == 1
    e2e = FitConfig(interactions="i.csv", out="o")
    e2e.items.kind, e2e.items.images = "e2e", "covers"
    apply_preset(e2e, "pixelrec")
    preset_check.check_preset_inputs(e2e)
    assert lines[-1] == preset_check.RANDOM_WEIGHTS_WARNING and len(lines) == 2
