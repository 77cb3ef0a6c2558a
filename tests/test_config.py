"""FitConfig: validation, presets (SPEC §6 reference preset) and the config.json round trip."""

from __future__ import annotations

import copy
import json

import pytest

from pixelrec.errors import PixelrecError
from pixelrec.recommend.config import (
    PIXELREC_PRESET,
    FitConfig,
    ItemsConfig,
    TrainConfig,
    apply_preset,
)
from pixelrec.recommend.model import LossConfig
from pixelrec.recommend.sequence import SequenceConfig


def cfg(**items) -> FitConfig:
    return FitConfig(interactions="i.csv", out="run", items=ItemsConfig(**items))


# ---- validate ----------------------------------------------------------------------------------


def test_defaults_validate():
    c = cfg()
    c.validate()
    assert c.items.kind == "id" and c.preset == "default"


@pytest.mark.parametrize("model, layers, lr", [("sasrec", 2, 1e-3), ("gru4rec", 1, 2e-3)])
def test_unset_layers_and_lr_take_the_models_default(model, layers, lr):
    c = cfg()
    c.model.model = model
    assert c.model.layers is None and c.train.lr is None
    c.validate()
    assert (c.model.layers, c.train.lr) == (layers, lr)
    assert json.loads(json.dumps(c.to_dict()))["model"]["layers"] == layers  # config.json records them


def test_given_layers_and_lr_are_kept():
    c = cfg()
    c.model.model, c.model.layers, c.train.lr = "gru4rec", 3, 5e-4
    c.validate()
    assert (c.model.layers, c.train.lr) == (3, 5e-4)


def test_preset_sets_layers_and_lr_for_every_model():
    c = cfg()
    c.model.model = "gru4rec"
    apply_preset(c, "pixelrec")
    c.validate()
    assert (c.model.layers, c.train.lr) == (2, 1e-4)


def test_unknown_model():
    c = cfg()
    c.model.model = "bert4rec"
    with pytest.raises(PixelrecError, match="unknown --model 'bert4rec'"):
        c.validate()


@pytest.mark.parametrize("kind", ["id", "frozen", "partial", "e2e", "hybrid"])
def test_every_kind_validates_with_its_inputs(kind):
    cfg(kind=kind, cache="c.h5", images="covers").validate()


def test_unknown_kind():
    with pytest.raises(PixelrecError) as err:
        cfg(kind="pixels").validate()
    msg = str(err.value)
    assert "'pixels'" in msg and "--items" in msg and "frozen" in msg


@pytest.mark.parametrize("kind", ["frozen", "partial", "hybrid"])
def test_cache_kinds_need_a_cache(kind):
    with pytest.raises(PixelrecError) as err:
        cfg(kind=kind).validate()
    msg = str(err.value)
    assert "--cache" in msg and kind in msg and "pixelrec encode" in msg


def test_e2e_needs_images():
    with pytest.raises(PixelrecError) as err:
        cfg(kind="e2e").validate()
    assert "--images" in str(err.value)
    # a cache is not a substitute for the images
    with pytest.raises(PixelrecError, match="--images"):
        cfg(kind="e2e", cache="c.h5").validate()


def test_unknown_loss_and_windows():
    c = cfg()
    c.loss.loss = "hinge"
    with pytest.raises(PixelrecError, match="--loss 'hinge'"):
        c.validate()
    c = cfg()
    c.train.windows = "overlap"
    with pytest.raises(PixelrecError, match="--windows 'overlap'"):
        c.validate()


@pytest.mark.parametrize("section,field,flag", [
    ("model", "max_len", "--max-len"),
    ("model", "dim", "--dim"),
    ("train", "epochs", "--epochs"),
    ("train", "batch_size", "--batch-size"),
])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_must_be_positive(section, field, flag, value):
    c = cfg()
    setattr(getattr(c, section), field, value)
    with pytest.raises(PixelrecError) as err:
        c.validate()
    assert flag in str(err.value) and str(value) in str(err.value)
    setattr(getattr(c, section), field, 1)
    c.validate()


# ---- presets -----------------------------------------------------------------------------------


def test_pixelrec_preset_values():
    c = apply_preset(cfg(), "pixelrec")
    assert c.preset == "pixelrec"
    assert c.model.dim == 512
    assert c.model.max_len == 10
    assert c.model.layers == 2 and c.model.heads == 4 and c.model.inner_mult == 2
    assert c.model.dropout == 0.1 and c.model.attn_dropout == 0.1
    assert c.model.positions == "absolute"  # learned position embeddings, as the reference code
    assert c.train.windows == "chunks"
    assert c.loss.loss == "bpr"
    assert c.train.lr == 1e-4 and c.train.weight_decay == 0.1
    assert c.train.encoder_lr == 1e-4 and c.train.encoder_weight_decay == 0.0
    assert c.train.patience == 30
    assert c.items.head == "token_relu_mean"
    assert c.items.tune_blocks == 2
    c.validate()


def test_pixelrec_preset_leaves_other_settings_alone():
    c = cfg(kind="frozen", cache="c.h5")
    c.train.seed = 7
    c.train.epochs = 3
    apply_preset(c, "pixelrec")
    assert c.items.kind == "frozen" and c.items.cache == "c.h5"
    assert c.train.seed == 7 and c.train.epochs == 3
    assert c.model.model == "sasrec"


def test_preset_keeps_explicit_keys():
    c = cfg()
    c.model.dim = 64
    c.train.lr = 3e-3
    c.loss.loss = "softmax"
    apply_preset(c, "pixelrec", explicit={"model.dim", "train.lr", "loss.loss"})
    assert c.model.dim == 64 and c.train.lr == 3e-3 and c.loss.loss == "softmax"
    # everything not explicit still follows the preset
    assert c.model.max_len == 10 and c.train.windows == "chunks" and c.train.weight_decay == 0.1


def test_default_preset_changes_nothing():
    c = cfg()
    before = copy.deepcopy(c.to_dict())
    apply_preset(c, "default")
    assert c.to_dict() == before


def test_unknown_preset():
    with pytest.raises(PixelrecError) as err:
        apply_preset(cfg(), "sasrec2018")
    msg = str(err.value)
    assert "'sasrec2018'" in msg and "pixelrec" in msg


def test_preset_table_does_not_change_when_applied():
    snapshot = dict(PIXELREC_PRESET)
    c = apply_preset(cfg(), "pixelrec")
    c.model.dim = 8
    assert PIXELREC_PRESET == snapshot
    assert apply_preset(cfg(), "pixelrec").model.dim == 512


# ---- to_dict / from_dict -----------------------------------------------------------------------


def full_config() -> FitConfig:
    return FitConfig(
        interactions="/data/i.csv",
        out="/runs/a",
        items=ItemsConfig(kind="partial", cache="c.h5", tune_blocks=2, adapter="mlp", head="token_relu_mean"),
        model=SequenceConfig(model="gru4rec", dim=32, max_len=7, layers=1, gru_hidden=48),
        loss=LossConfig(loss="softmax", negatives=256, full_softmax_max_items=5000),
        train=TrainConfig(epochs=3, lr=5e-4, windows="chunks", stride=3, seed=11, amp=False),
        preset="pixelrec",
        init_from="/runs/base",
    )


def test_round_trip():
    c = full_config()
    d = c.to_dict()
    assert FitConfig.from_dict(d) == c
    # through JSON too (config.json)
    assert FitConfig.from_dict(json.loads(json.dumps(d))) == c
    assert d["model"]["gru_hidden"] == 48 and d["loss"]["negatives"] == 256 and d["init_from"] == "/runs/base"


def test_round_trip_of_defaults():
    c = FitConfig(interactions="i.csv", out="o")
    assert FitConfig.from_dict(c.to_dict()) == c


def test_runs_written_before_positions_existed_load_as_absolute():
    assert SequenceConfig().positions == "relative"
    c = FitConfig.from_dict({"interactions": "i.csv", "out": "o", "model": {"model": "sasrec", "dim": 24}})
    assert c.model.positions == "absolute"  # what those runs' checkpoints hold (pos.weight)
    c = FitConfig.from_dict(FitConfig(interactions="i.csv", out="o").to_dict())
    assert c.model.positions == "relative"


def test_windows_default_per_model():
    for model, windows, stride in (("sasrec", "sliding", 3), ("gru4rec", "overlapping", 10)):
        c = FitConfig(interactions="i.csv", out="o")
        c.model.model = model
        c.validate()
        assert (c.train.windows, c.train.stride) == (windows, stride)
    c = FitConfig(interactions="i.csv", out="o")
    c.model.model, c.train.windows = "gru4rec", "sliding"  # asked for: kept, with sliding's stride
    c.validate()
    assert (c.train.windows, c.train.stride) == ("sliding", 3)
    c.train.windows = "windmill"
    with pytest.raises(PixelrecError, match="--windows 'windmill'; expected sliding, overlapping or chunks"):
        c.validate()


def test_auto_stride_depends_on_the_tower_cost():
    def stride(kind, max_len=20, **items):
        c = FitConfig(interactions="i.csv", out="o", items=ItemsConfig(kind=kind, cache="c.h5", images="d", **items))
        c.model.max_len = max_len
        c.validate()
        return c.train.stride

    assert stride("id") == 3 and stride("frozen") == 3 and stride("hybrid") == 3
    assert stride("partial") == 10 and stride("e2e") == 10 and stride("hybrid", image_branch="partial") == 10
    assert stride("id", max_len=50) == 8 and stride("id", max_len=5) == 1 and stride("e2e", max_len=1) == 1
    c = FitConfig(interactions="i.csv", out="o")
    c.train.stride = 7  # asked for: kept
    c.validate()
    assert c.train.stride == 7


@pytest.mark.parametrize("value", [-1, 21])
def test_stride_outside_zero_to_max_len_is_refused(value):
    c = FitConfig(interactions="i.csv", out="o")
    c.train.stride = value
    with pytest.raises(PixelrecError, match=rf"--stride must be between 1 and --max-len \(20\), or 0 for auto \(got {value}\)"):
        c.validate()


def test_unknown_positions_are_refused():
    c = FitConfig(interactions="i.csv", out="o")
    c.model.positions = "rotary"
    with pytest.raises(PixelrecError, match="--positions 'rotary'"):
        c.validate()


def test_from_dict_tolerates_missing_and_unknown_keys():
    # older or newer config.json files: missing keys take defaults, unknown ones are ignored
    d = {"interactions": "i.csv", "out": "o", "model": {"dim": 24, "future_option": 1}, "extra": True}
    c = FitConfig.from_dict(d)
    assert c.model.dim == 24 and c.model.max_len == SequenceConfig().max_len
    assert c.items == ItemsConfig() and c.train == TrainConfig() and c.loss == LossConfig()
    assert c.preset == "default" and c.init_from is None
