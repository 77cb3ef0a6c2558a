"""FitConfig: defaults resolved per model, validation, presets (the PixelRec reference code's
settings) and the config.json round trip."""

from __future__ import annotations

import copy
import json

import pytest

from pixelrec.errors import PixelrecError
from pixelrec.recommend.config import (
    CACHE_KINDS,
    IMAGE_KINDS,
    ITEM_KINDS,
    NOT_OPTIONS,
    PIXELREC_PRESET,
    FitConfig,
    ItemsConfig,
    LossConfig,
    SequenceConfig,
    TrainConfig,
    apply_preset,
    fit_options,
)


def cfg(**items) -> FitConfig:
    return FitConfig(interactions="i.csv", out="run", items=ItemsConfig(**items))


# ---- validate ----------------------------------------------------------------------------------


@pytest.mark.smoke
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


@pytest.mark.parametrize("model, layers, dim, batch", [("sasrec", 2, 512, 64), ("gru4rec", 1, 512, 64),
                                                       ("nextitnet", 3, 1024, 64), ("lightsans", 1, 512, 512),
                                                       ("srgnn", 2, 512, 512)])
def test_preset_sets_each_models_own_reference_values(model, layers, dim, batch):
    c = cfg()
    c.model.model = model
    apply_preset(c, "pixelrec")
    c.validate()
    assert (c.model.layers, c.model.dim, c.train.batch_size, c.train.lr) == (layers, dim, batch, 1e-4)


def test_unknown_model():
    c = cfg()
    c.model.model = "caser"
    with pytest.raises(PixelrecError, match="unknown --model 'caser'"):
        c.validate()


def inputs_of(kind: str) -> dict[str, str]:
    """The inputs the item tower `kind` reads, and only those."""
    return {**({"cache": "c.h5"} if kind in CACHE_KINDS else {}), **({"images": "covers"} if kind in IMAGE_KINDS else {})}


@pytest.mark.parametrize("kind", ITEM_KINDS)
def test_every_kind_validates_with_its_inputs(kind):
    cfg(kind=kind, **inputs_of(kind)).validate()


@pytest.mark.parametrize("kind", [k for k in ITEM_KINDS if k not in CACHE_KINDS])
def test_a_cache_the_tower_ignores_is_refused(kind):
    with pytest.raises(PixelrecError) as err:
        cfg(kind=kind, cache="c.h5", **inputs_of(kind)).validate()
    msg = str(err.value)
    assert "--cache" in msg and f"--items {kind}" in msg and "frozen, partial, hybrid or side" in msg


@pytest.mark.parametrize("kind", [k for k in ITEM_KINDS if k not in IMAGE_KINDS])
def test_images_the_tower_ignores_are_refused(kind):
    with pytest.raises(PixelrecError) as err:
        cfg(kind=kind, images="covers", **inputs_of(kind)).validate()
    assert "--images" in str(err.value) and f"--items {kind}" in str(err.value)


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
    assert c.train.patience == 31  # the reference's stopping_step 30 stops on the 31st epoch without a gain
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
        loss=LossConfig(loss="softmax", softmax="sampled", negatives=256, full_softmax_max_share=0.25),
        train=TrainConfig(epochs=3, lr=5e-4, windows="chunks", stride=3, seed=11, precision="fp32"),
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
    for model, windows, stride in ((("sasrec", "sliding", 3), ("gru4rec", "overlapping", 10), ("nextitnet", "sliding", 1),
                                    ("lightsans", "prefixes", 1), ("srgnn", "prefixes", 1))):
        c = FitConfig(interactions="i.csv", out="o")
        c.model.model = model
        c.validate()
        assert (c.train.windows, c.train.stride) == (windows, stride)
    c = FitConfig(interactions="i.csv", out="o")
    c.model.model, c.train.windows = "gru4rec", "sliding"  # asked for: kept, with sliding's stride
    c.validate()
    assert (c.train.windows, c.train.stride) == ("sliding", 3)
    c.train.windows = "windmill"
    with pytest.raises(PixelrecError, match="--windows 'windmill'; expected sliding, overlapping, chunks or prefixes"):
        c.validate()


def test_auto_stride_depends_on_the_tower_cost():
    def stride(kind, max_len=20, **items):
        c = FitConfig(interactions="i.csv", out="o", items=ItemsConfig(kind=kind, **inputs_of(kind), **items))
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


# ---- resolve_defaults / check / validate -------------------------------------------------------


def test_resolve_defaults_fills_only_what_was_left_unset():
    c = FitConfig(interactions="i.csv", out="o")
    c.model.model, c.train.lr = "gru4rec", 5e-4
    assert c.resolve_defaults() is c
    assert (c.model.layers, c.train.lr, c.train.windows, c.train.stride) == (1, 5e-4, "overlapping", 10)
    before = c.to_dict()
    c.resolve_defaults()  # idempotent
    assert c.to_dict() == before


def test_check_changes_nothing_and_accepts_an_unresolved_config():
    c = FitConfig(interactions="i.csv", out="o")
    before = c.to_dict()
    c.check()
    assert c.to_dict() == before
    assert c.model.layers is None and c.train.lr is None and c.train.windows is None and c.train.stride == 0


def test_validate_is_resolve_then_check(monkeypatch):
    calls = []
    monkeypatch.setattr(FitConfig, "resolve_defaults", lambda self: calls.append("resolve") or self)
    monkeypatch.setattr(FitConfig, "check", lambda self: calls.append("check"))
    FitConfig(interactions="i.csv", out="o").validate()
    assert calls == ["resolve", "check"]


def test_check_sees_a_bad_value_even_when_resolve_cannot_fill_it():
    c = FitConfig(interactions="i.csv", out="o")
    c.model.model = "caser"  # no per-model defaults: layers stay None
    with pytest.raises(PixelrecError, match="unknown --model 'caser'; expected sasrec, gru4rec, nextitnet, lightsans, "
                                            "srgnn, bert4rec, "):
        c.validate()


FLOAT_OPTIONS = [o for o in fit_options() if o.type is float]


@pytest.mark.parametrize("opt", FLOAT_OPTIONS, ids=lambda o: o.flag)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(opt, value):
    c = FitConfig(interactions="i.csv", out="o")
    c.set(opt.key, value)
    with pytest.raises(PixelrecError, match=rf"^{opt.flag} must be a finite number \(got {value}\)$"):
        c.check()


@pytest.mark.parametrize("key, value, message", [
    ("items.tune_blocks", -2, "--tune-blocks must be at least -1 (got -2)"),
    ("items.image_size", 0, "--image-size must be between 1 and 1024 (got 0)"),
    ("items.image_size", 5000, "--image-size must be between 1 and 1024 (got 5000)"),
    ("items.dropout", 1.0, "--item-dropout must be in [0, 1) (got 1.0)"),
    ("model.layers", 0, "--layers must be at least 1 (got 0)"),
    ("loss.negatives", -5, "--negatives must not be negative (got -5)"),
    ("train.lr", -1.0, "--lr must not be negative (got -1.0)"),
    ("train.seed", -1, "--seed must be between 0 and 4294967295 (got -1)"),
    ("train.seed", 2**40, f"--seed must be between 0 and 4294967295 (got {2**40})"),
    ("train.min_interactions", 2, "--min-interactions must be at least 3 (got 2)"),
    ("train.patience", 0, "--patience must be at least 1 (got 0)"),
    ("model.attn_dropout", 1.0, "--attn-dropout must be in [0, 1) (got 1.0)"),
    ("model.attn_dropout", float("nan"), "--attn-dropout must be a finite number (got nan)"),
    ("model.inner_mult", 0, "model.inner_mult must be at least 1 (got 0)"),
    ("model.gru_hidden", -1, "model.gru_hidden must be at least 0 (got -1)"),
    ("loss.full_softmax_max_share", 1.0, "loss.full_softmax_max_share must be in (0, 1) (got 1.0)"),
    ("loss.full_softmax_max_share", 0.0, "loss.full_softmax_max_share must be in (0, 1) (got 0.0)"),
    ("train.eval_batch_size", 0, "train.eval_batch_size must be at least 1 (got 0)"),
    ("train.cold_threshold", -1, "train.cold_threshold must be at least 0 (got -1)"),
])
def test_bounds(key, value, message):
    c = FitConfig(interactions="i.csv", out="o")
    c.set(key, value)
    with pytest.raises(PixelrecError) as err:
        c.check()
    assert str(err.value) == message


@pytest.mark.parametrize("key", [k for k in sorted(NOT_OPTIONS)
                                 if not isinstance(FitConfig(interactions="i", out="o").get(k), bool)])
def test_settings_that_are_not_options_are_still_checked(key):
    """Fields set only through the Python API are bounded too, and the message names them."""
    c = FitConfig(interactions="i.csv", out="o")
    c.set(key, -10)
    with pytest.raises(PixelrecError, match=rf"^{key} must be "):
        c.check()


def test_get_and_set_by_key():
    c = FitConfig(interactions="i.csv", out="o")
    c.set("model.dim", 8)
    c.set("init_from", "/runs/a")
    assert c.get("model.dim") == 8 == c.model.dim and c.get("init_from") == "/runs/a"


# ---- settings a tower or model does not read: null in config.json ---------------------------------
@pytest.mark.parametrize("kind, branch, model, read, unread", [
    ("id", "frozen", "sasrec", {"model.heads"}, {"items.encoder", "items.adapter", "items.hybrid", "model.gru_hidden"}),
    ("frozen", "frozen", "sasrec", {"items.adapter", "items.feature_norm", "items.head"},
     {"items.encoder", "items.tune_blocks", "items.tune_head", "items.id_dropout"}),
    ("partial", "frozen", "gru4rec", {"items.tune_blocks", "items.tune_head", "model.gru_hidden"},
     {"items.feature_norm", "items.pretrained", "model.heads", "model.positions"}),
    ("e2e", "frozen", "sasrec", {"items.encoder", "items.pretrained", "items.adapter"}, {"items.image_branch"}),
    ("hybrid", "partial", "sasrec", {"items.id_dropout", "items.image_branch", "items.tune_blocks"},
     {"items.encoder", "items.feature_norm"}),
])
def test_record_writes_unread_settings_as_null(kind, branch, model, read, unread):
    c = cfg(kind=kind, image_branch=branch, **inputs_of(kind))
    c.model.model = model
    c.validate()
    record = c.record()
    for key in read:
        section, name = key.split(".")
        assert record[section][name] is not None, key
    for key in unread:
        section, name = key.split(".")
        assert record[section][name] is None, key
    again = FitConfig.from_dict(json.loads(json.dumps(record)))
    assert again.record() == record
    assert again.items.encoder == ("ViT-B-32" if kind != "e2e" else c.items.encoder)  # null -> the default


def test_a_null_setting_the_run_reads_is_not_defaulted():
    record = cfg().validate().record()
    record["model"]["dim"] = None
    assert FitConfig.from_dict(record).model.dim is None  # rundir refuses it by name (test_run_reliability)
