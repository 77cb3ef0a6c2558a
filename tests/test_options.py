"""One source for every option: `fit`'s options are generated from the FitConfig fields, and the
`encode` / `synth` options agree with the dataclasses they fill (defaults, choices, help)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import pytest

from pixelrec.cli import cli
from pixelrec.recommend import config
from pixelrec.recommend.models.registry import MODEL_SPECS
from pixelrec.recommend.config import (
    DEFAULT_LAYERS,
    DEFAULT_LR,
    DEFAULT_WINDOWS,
    NOT_OPTIONS,
    OPTION,
    FitConfig,
    fit_options,
    per_model,
)

FIT = cli.commands["fit"]
# Options of `fit` that are not FitConfig settings: they say what to do with the run, not how to train,
# or where the settings come from (--config) and go (--print-config). -q/--quiet: every subcommand's.
FIT_RUN_OPTIONS = {"resume", "overwrite", "as_json", "config_file", "print_config", "tensorboard_dir", "quiet"}


def all_fields(cls=FitConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf field of FitConfig by "section.field" key."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out.update(all_fields(f.default_factory, f"{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def fit_param(opt) -> click.Option:
    return next(p for p in FIT.params if p.name == opt.param_name)


def default_of(command: click.Command, param: click.Parameter) -> object:
    """The value the command receives for `param` when it is not given."""
    with command.make_context(command.name, [], resilient_parsing=True) as ctx:
        return ctx.params[param.name]


def help_text(param: click.Option) -> str:
    """The option's help as `fit --help` prints it (default included), on one line."""
    with click.Context(FIT) as ctx:
        return " ".join(param.get_help_record(ctx)[1].split())


# ---------------------------------------------------------------------------------------- fit
def test_every_field_is_an_option_or_listed_with_a_reason():
    fields = all_fields()
    options = {o.key for o in fit_options()}
    for key, f in fields.items():
        is_option = OPTION in f.metadata
        assert is_option != (key in NOT_OPTIONS), (
            f"FitConfig field {key}: {'an option and' if is_option else 'neither an option nor'} listed in "
            f"NOT_OPTIONS; declare it with setting(...) or give the reason it is not an option")
        assert is_option == (key in options), key
    assert set(NOT_OPTIONS) <= set(fields), f"NOT_OPTIONS names fields that do not exist: {set(NOT_OPTIONS) - set(fields)}"
    assert all(len(reason) > 20 for reason in NOT_OPTIONS.values())


def test_every_fit_option_maps_to_a_field():
    by_param = {o.param_name: o for o in fit_options()}
    fields = all_fields()
    for param in FIT.params:
        if param.name in FIT_RUN_OPTIONS:
            continue
        assert param.name in by_param, f"fit option {param.opts} sets no FitConfig field"
        assert by_param[param.name].key in fields
    assert {p.name for p in FIT.params} == set(by_param) | FIT_RUN_OPTIONS
    assert len(by_param) == len(fit_options()), "two fields share one option name"


@pytest.mark.parametrize("opt", fit_options(), ids=lambda o: o.flag)
def test_option_agrees_with_its_field(opt):
    param = fit_param(opt)
    f = all_fields()[opt.key]
    assert param.opts == [opt.flag]
    if f.default is dataclasses.MISSING:  # required, here or in --config FILE: `fit` checks it
        assert not param.required and default_of(FIT, param) is None
        assert "[required, here or in --config]" in help_text(param)
    else:
        assert not param.required and default_of(FIT, param) == f.default
    assert opt.spec.help in help_text(param)
    if opt.type is bool:
        assert param.is_flag
    choices = opt.spec.choices
    if choices is not None:
        assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == choices
        constant = [name for name, value in vars(config).items() if name.isupper() and value is choices]
        assert constant, f"{opt.flag}: its choices must be a module-level constant of recommend/config.py"
    else:
        assert not isinstance(param.type, click.Choice)


@pytest.mark.parametrize("opt", [o for o in fit_options() if o.spec.choices], ids=lambda o: o.flag)
def test_validate_accepts_exactly_the_options_choices(opt):
    """The choice list shown by --help is the one `check` enforces."""
    for value in opt.spec.choices:
        c = FitConfig(interactions="i.csv", out="o")
        c.set(opt.key, value)
        if c.items.uses_cache:
            c.items.cache = "c.h5"
        if c.items.kind == "e2e":
            c.items.images = "covers"
        if c.model.model == "vbpr":  # reads the frozen cache
            c.items.kind, c.items.cache = "frozen", "c.h5"
        if c.model.model == "acf":  # reads the cache whatever the tower
            c.items.cache = "c.h5"
        if c.model.model == "visrank":  # ranks by the frozen cached embeddings
            c.items.kind, c.items.cache = "frozen", "c.h5"
        c.validate()
    c = FitConfig(interactions="i.csv", out="o")
    c.set(opt.key, "no-such-choice")
    with pytest.raises(Exception, match=rf"unknown {opt.flag} 'no-such-choice'"):
        c.check()


def test_fit_help_shows_every_default():
    for opt in fit_options():
        text = help_text(fit_param(opt))
        if opt.required:
            assert "[required, here or in --config]" in text, opt.flag
        elif opt.spec.default_text is not None:
            assert f"[default: {opt.spec.default_text}]" in text, opt.flag
        elif opt.default is not None and opt.type is not bool:
            assert f"[default: {opt.default}]" in text, opt.flag


def test_per_model_defaults_are_written_from_the_tables():
    by_key = {o.key: o for o in fit_options()}
    assert by_key["model.layers"].spec.default_text == per_model(DEFAULT_LAYERS) == (
        "2 for sasrec, 1 for gru4rec, 1 for nextitnet, 1 for lightsans, 1 for srgnn, 2 for bert4rec")
    assert by_key["train.lr"].spec.default_text == per_model(DEFAULT_LR) == (
        "0.001 for sasrec, 0.002 for gru4rec, 0.001 for nextitnet, 0.001 for lightsans, 0.001 for srgnn, "
        "0.001 for bert4rec, 0.01 for mf, 0.001 for fm, 0.005 for dssm, 0.01 for vbpr, 0.01 for acf, 0 for visrank")
    assert by_key["train.windows"].spec.default_text == per_model(DEFAULT_WINDOWS)
    # shared settings a model may default differently: its value, then the one every other model takes
    assert by_key["model.dropout"].spec.default_text == "0.2 for bert4rec, 0.3 for the others"
    assert by_key["model.attn_dropout"].spec.default_text == "0.2 for bert4rec, 0.3 for the others"
    assert set(DEFAULT_LR) == set(DEFAULT_WINDOWS) == set(config.MODELS)
    # a default number of layers for exactly the models that stack layers
    assert set(DEFAULT_LAYERS) == {m for m, spec in MODEL_SPECS.items() if "layers" in spec.reads}
    assert set(config.PRESETS) == set(config.PRESET_NAMES)


def test_preset_keys_are_settings():
    fields = all_fields()
    for name, table in config.PRESETS.items():
        assert set(table) <= set(fields), (name, set(table) - set(fields))
    for model, spec in config.MODEL_SPECS.items():  # each model's own preset values
        for name, table in spec.presets.items():
            assert name in config.PRESETS and set(table) <= set(fields), (model, name, set(table) - set(fields))


def test_config_module_does_not_import_torch():
    code = ("import sys, pixelrec.recommend.config, pixelrec.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_old_import_paths_name_the_same_classes():
    from pixelrec.recommend.model import LossConfig
    from pixelrec.recommend.sequence import DEFAULT_LAYERS as layers, SequenceConfig

    assert LossConfig is config.LossConfig and SequenceConfig is config.SequenceConfig
    assert layers is DEFAULT_LAYERS


# ---------------------------------------------------------------------------------------- encode
ENCODE_FIELDS = {  # option -> (dataclass, field)
    "images": ("EncodeConfig", "images"), "out": ("EncodeConfig", "out"),
    "interactions": ("EncodeConfig", "interactions"), "encoder": ("EncoderConfig", "model"),
    "pretrained": ("EncoderConfig", "pretrained"), "pooling": ("EncoderConfig", "pooling"),
    "preset": ("EncoderConfig", "preset"), "image_size": ("EncoderConfig", "image_size"),
    "seed": ("EncoderConfig", "seed"), "split_block": ("EncodeConfig", "split_block"),
    "batch_size": ("EncodeConfig", "batch_size"), "workers": ("EncodeConfig", "num_workers"),
    "device": ("EncodeConfig", "device"), "float32": ("EncodeConfig", "float32"),
    "normalize": ("EncodeConfig", "normalize"), "skip_missing": ("EncodeConfig", "skip_missing"),
    "overwrite": ("EncodeConfig", "overwrite"), "precision": ("EncodeConfig", "precision"),
    "follow_symlinks": ("EncodeConfig", "follow_symlinks"), "hidden": ("EncodeConfig", "hidden"),
    "taps": ("EncodeConfig", "taps"),
}
ENCODE_NOT_FIELDS = {"from_run": "picks the encoder (a run's item tower) instead of an EncoderConfig",
                     "verify": "checks an existing cache (encode.cache.verify_cache) instead of encoding",
                     "old_model": "--model, the hidden old name of --encoder",
                     "quiet": "every subcommand's -q/--quiet"}


def _defaults(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_encode_options_agree_with_encode_config():
    from pixelrec.encode.encoder import POOLINGS, PRESETS, EncoderConfig
    from pixelrec.encode.pipeline import EncodeConfig

    classes = {"EncodeConfig": _defaults(EncodeConfig), "EncoderConfig": _defaults(EncoderConfig)}
    params = {p.name: p for p in cli.commands["encode"].params}
    assert set(params) == set(ENCODE_FIELDS) | set(ENCODE_NOT_FIELDS)
    for name, (cls, fld) in ENCODE_FIELDS.items():
        default = classes[cls][fld]
        param = params[name]
        given = default_of(cli.commands["encode"], param)
        if default is dataclasses.MISSING:  # required, except with --verify (checked in the command)
            assert given is None and "[required]" in param.help, name
        else:
            assert given == default, (name, given, default)
    assert tuple(params["pooling"].type.choices) == POOLINGS
    assert tuple(params["preset"].type.choices) == PRESETS


# ---------------------------------------------------------------------------------------- synth
SYNTH_FIELDS = {"users": "users", "items": "items", "cold_items": "cold_items", "seed": "seed",
                "image_size": "image_size", "styles": "styles", "min_len": "min_len", "max_len": "max_len",
                "style_seed": "style_seed", "item_prefix": "item_prefix", "user_prefix": "user_prefix",
                "lmdb": "write_lmdb"}
SYNTH_NOT_OPTIONS = {"zipf", "appeal", "p_stay", "p_next", "p_two_styles", "cold_user_frac", "jpeg_quality"}


def test_synth_options_agree_with_synth_config():
    from pixelrec.data.synth import SynthConfig

    defaults = _defaults(SynthConfig)
    params = {p.name: p for p in cli.commands["synth"].params}
    assert set(params) == set(SYNTH_FIELDS) | {"out_dir", "quiet"}
    assert set(defaults) == set(SYNTH_FIELDS.values()) | SYNTH_NOT_OPTIONS, "a new SynthConfig field: make it an option or list it"
    for name, fld in SYNTH_FIELDS.items():
        given = default_of(cli.commands["synth"], params[name])
        assert given == defaults[fld], (name, given, defaults[fld])


# ---------------------------------------------------------------------------------------- others
def test_index_metric_choices_are_the_index_metrics():
    from pixelrec.index.faiss_index import METRICS

    metric = next(p for p in cli.commands["index"].params if p.name == "metric")
    assert tuple(metric.type.choices) == METRICS


def test_demo_towers_are_the_item_kinds():
    towers = next(p for p in cli.commands["demo"].params if p.name == "towers")
    assert set(towers.default.split(",")) <= set(config.ITEM_KINDS)


def test_demo_towers_default_is_the_demo_configs():
    from pixelrec.demo import DemoConfig

    towers = next(p for p in cli.commands["demo"].params if p.name == "towers")
    assert tuple(towers.default.split(",")) == DemoConfig().towers
    assert "hybrid" in DemoConfig().towers  # the cold-start row of the demo's table
