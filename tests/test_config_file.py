"""`pixelrec fit --config FILE` and `--print-config`: TOML / YAML / JSON files in the shape of a run's
config.json, a run's own config.json given back, command-line options winning over the file, the
file winning over --preset, and every bad file refused in one line naming file, key and type."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fixtures_runs import TINY_ARGS, assert_one_line_error, handmade_dataset, invoke, trained_run
from pixelrec.errors import PixelrecError
from pixelrec.recommend.config import FitConfig
from pixelrec.runs.config_file import dump_settings, read_config_file, tomllib


def printed(*args) -> dict:
    """The resolved settings `fit ... --print-config --json` prints."""
    r = invoke(["fit", *args, "--print-config", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------- round trips
def test_a_runs_config_json_given_back_resolves_to_the_same_settings():
    run, _ = trained_run()
    recorded = json.loads((run / "config.json").read_text())["config"]
    assert recorded["items"]["encoder"] is None  # an id tower: the encoder settings are null
    assert printed("--config", run / "config.json") == recorded
    assert printed("--config", run) == recorded  # the run directory names its config.json


def test_printed_toml_reads_back_to_the_same_settings(tmp_path):
    run, _ = trained_run()
    r = invoke(["fit", "--config", run, "--print-config"])
    assert r.exit_code == 0, r.output
    toml = write(tmp_path / "settings.toml", r.stdout)
    assert tomllib.loads(r.stdout)["model"]["dim"] == 16
    assert printed("--config", toml) == printed("--config", run)


@pytest.mark.parametrize("kind, extra", [
    ("e2e", {"images": "covers", "encoder": "pixelrec-tiny-vit", "tune_blocks": 2}),
    ("hybrid", {"cache": "c.h5", "image_branch": "partial", "id_dropout": 0.1}),
    ("frozen", {"cache": "c.h5", "feature_norm": "whiten"}),
])
def test_every_tower_round_trips_through_toml(tmp_path, kind, extra):
    cfg = FitConfig(interactions="i.csv", out="run")
    cfg.items.kind = kind
    for name, value in extra.items():
        setattr(cfg.items, name, value)
    cfg.model.model = "gru4rec"
    cfg.validate()
    path = write(tmp_path / "c.toml", dump_settings(cfg))
    again = printed("--config", path)
    assert again == cfg.record()
    assert again["model"]["heads"] is None and again["model"]["gru_hidden"] == 0  # gru4rec reads no heads
    for name, value in extra.items():
        assert again["items"][name] == value


# ---------------------------------------------------------------------------------------- precedence
def test_options_given_win_over_the_file_and_the_file_over_the_preset(tmp_path):
    path = write(tmp_path / "base.toml", 'preset = "pixelrec"\n[model]\ndim = 32\nmax_len = 6\n[train]\nepochs = 5\n')
    got = printed("--config", path, "--dim", "16", "--interactions", "x.csv")
    assert got["model"]["dim"] == 16  # typed: wins over the file
    assert got["model"]["max_len"] == 6 and got["train"]["epochs"] == 5  # the file's
    assert got["preset"] == "pixelrec" and got["model"]["heads"] == 4  # the preset fills what neither gave
    assert got["interactions"] == "x.csv" and got["out"] is None


def test_yaml_and_json_files(tmp_path):
    yaml = write(tmp_path / "a.yaml", "model:\n  model: gru4rec\n  dim: 24\ntrain:\n  lr: 1\n")
    got = printed("--config", yaml)
    assert (got["model"]["model"], got["model"]["dim"], got["train"]["lr"]) == ("gru4rec", 24, 1.0)
    assert got["model"]["layers"] == 1 and got["train"]["windows"] == "overlapping"  # gru4rec's defaults
    assert printed("--config", write(tmp_path / "b.yml", "items:\n  cache_in_memory: no\n"))["items"]["kind"] == "id"
    yes = printed("--config", write(tmp_path / "c.yml", "items:\n  kind: e2e\n  images: covers\n  cache_in_memory: yes\n"))
    assert yes["items"]["cache_in_memory"] == "yes"  # YAML's unquoted yes is a boolean: read as the choice
    js = write(tmp_path / "a.json", json.dumps({"items": {"kind": "id", "encoder": None}, "train": {"seed": 7}}))
    assert printed("--config", js)["train"]["seed"] == 7


def test_fit_trains_from_a_file_and_resumes_from_its_config_json(tmp_path):
    data = handmade_dataset()
    out = tmp_path / "run"
    path = write(tmp_path / "tiny.toml", f'interactions = "{data.path}"\nout = "{out}"\n'
                 '[model]\ndim = 16\nmax_len = 8\nlayers = 1\nheads = 1\n'
                 '[train]\nepochs = 1\nbatch_size = 32\ndevice = "cpu"\n')
    r = invoke(["fit", "--config", path, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs_run"] == 1
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["model"]["dim"] == 16 and recorded["train"]["epochs"] == 1
    # the run's own config.json (null settings included) continues it; --epochs typed wins
    r = invoke(["fit", "--config", out / "config.json", "--resume", "--epochs", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs_run"] == 2
    # without --resume, its `out` names the existing run: refused as any second fit into it
    r = invoke(["fit", "--config", out])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "already holds a run")


def test_print_config_needs_no_data_and_trains_nothing(tmp_path):
    got = printed("--out", tmp_path / "run", *TINY_ARGS)
    assert got["model"]["dim"] == 16 and got["train"]["stride"] == 1  # resolved: max_len 8 // 6
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("name, text, needles", [
    ("a.toml", "[model\ndim = 16\n", ["not valid TOML", "line 1"]),
    ("a.toml", "[model]\ndims = 16\n", ["unknown key 'model.dims'", "did you mean 'model.dim'"]),
    ("a.toml", "epochs = 3\n", ["unknown key 'epochs'", "'train.epochs'", "--epochs"]),
    ("a.toml", "[model]\ndim = \"sixteen\"\n", ["model.dim is 'sixteen' (a string)", "expected an integer"]),
    ("a.toml", "[model]\ndim = 16.0\n", ["model.dim is 16.0", "expected an integer"]),
    ("a.toml", "[train]\ndeterministic = 1\n", ["train.deterministic is 1", "expected true or false"]),
    ("a.toml", "[train]\nlr = \"fast\"\n", ["train.lr", "expected a number (or null)"]),
    ("a.toml", "[train]\nlr = nan\n", ["train.lr is nan", "expected a finite number"]),
    ("a.toml", "[model]\ndropout = 1.5\n", ["model.dropout", "--dropout must be in [0, 1) (got 1.5)"]),
    ("a.toml", "[items]\nkind = \"pixels\"\n", ["items.kind", "unknown --items 'pixels'"]),
    ("a.toml", "model = 3\n", ["model must be a table of settings", "got a number"]),
    ("a.json", '{"model": {"dim": null}}', ["model.dim is null", "expected an integer"]),
    ("a.json", '{"model": {"heads": null}}', ["model.heads is null"]),  # sasrec reads heads
    ("a.json", '{"train": {"lr": NaN}}', ["not valid JSON", "NaN"]),
    ("a.json", "[1, 2]", ["expected a table of settings at the top, got a list"]),
    ("a.yaml", "model: [dim\n", ["not valid YAML"]),
    ("a.yaml", "train:\n  epochs: ten\n", ["train.epochs is 'ten'", "expected an integer"]),
    ("a.ini", "dim=3\n", ["unknown config format '.ini'", ".toml"]),
    # a model setting the file's model does not read names the file and its key, not an option
    ("a.toml", '[model]\nmodel = "gru4rec"\nheads = 4\n',
     ["[model] heads is not a setting of --model gru4rec", "--model sasrec", "remove it from the file"]),
    ("a.toml", b"[model]\ndim = \xff\n", ["not UTF-8 text (byte 14)"]),
])
def test_a_bad_file_is_one_line_naming_file_key_and_type(tmp_path, name, text, needles):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    r = invoke(["fit", "--config", path, "--interactions", "x.csv", "--out", tmp_path / "run"])
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.stderr, str(path), *needles)
    assert not (tmp_path / "run").exists()


def test_null_settings_the_tower_does_not_read_are_accepted(tmp_path):
    path = write(tmp_path / "a.json", json.dumps({"items": {"kind": "id", "encoder": None, "hybrid": None},
                                                   "model": {"model": "gru4rec", "heads": None}}))
    assert read_config_file(path).values == {"items.kind": "id", "model.model": "gru4rec"}


def test_missing_files_and_directories(tmp_path):
    with pytest.raises(PixelrecError, match="missing.toml: config file not found"):
        read_config_file(tmp_path / "missing.toml")
    with pytest.raises(PixelrecError, match="a directory without config.json"):
        read_config_file(tmp_path)
    r = invoke(["fit", "--epochs", "1"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "Missing option '--interactions'", "--config")


def test_records_beside_a_runs_settings_are_ignored():
    """config.json's data summary, versions, cache identity (not settings) are no unknown keys."""
    run, _ = trained_run()
    meta = json.loads((run / "config.json").read_text())
    assert {"data", "pixelrec_version", "run_format", "cache"} <= set(meta)
    values = read_config_file(run / "config.json").values
    assert "data" not in values and values["model.dim"] == 16


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    with pytest.raises(PixelrecError, match=r"a.yaml: reading YAML needs PyYAML \(pip install pyyaml\)"):
        read_config_file(write(tmp_path / "a.yaml", "model:\n  dim: 8\n"))
