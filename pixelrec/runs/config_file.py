"""`pixelrec fit --config FILE`: a run's settings from a file, and `--print-config` to write them.

A config file has the shape of the "config" object of a run's config.json: the top-level settings
`interactions`, `out`, `preset` and `init_from`, and one section per concern (`items`, `model`,
`loss`, `train`) whose keys are the FitConfig field names (`[model] dim = 64`, not `--dim`). It may
be TOML (.toml), YAML (.yaml / .yml) or JSON (.json); a run's own config.json (or its run
directory) is read too: its settings are its "config" object, and the records beside it (versions,
the data's summary and fingerprint, the cache's identity, the softmax's modelled costs, ...) are
ignored, as are the null settings its item tower or sequence model does not read.

Every key the file names counts as given: it wins over `--preset`, and an option typed on the
command line wins over the file. A key that is not a setting, a value of the wrong type, or a file
that does not parse is refused in one line naming the file, the key and the type expected.
Relative paths in the file are read from the current directory, as on the command line (so a
config.json given back from the directory its fit ran in names the same files).

This module does not import torch (`fit --print-config` needs none of it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PixelrecError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package (install_requires)
    import tomli as tomllib
from ..recommend.models.registry import MODEL_SETTINGS
from ..recommend.config import (
    FitConfig,
    ItemsConfig,
    LossConfig,
    SequenceConfig,
    TrainConfig,
    check_option_value,
    fit_options,
    unused_settings,
)

FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
# What marks a run's config.json: its settings sit under "config", beside records of the run
# (these two, the data's fingerprint, the cache's identity, ...), which a config file ignores.
RUN_MARKERS = ("pixelrec_version", "run_format")
SECTIONS = {"items": ItemsConfig, "model": SequenceConfig, "loss": LossConfig, "train": TrainConfig}
TOP_LEVEL = ("interactions", "out", "preset", "init_from")
MAX_BYTES = 1 << 20  # a config file is a few kilobytes; anything this large is not one

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Setting:
    """One FitConfig field as a config file names it."""

    key: str  # "section.field", or "field" at the top level
    type: type  # bool, int, float or str
    optional: bool  # null (or leaving it out) = its default, resolved later

    @property
    def expected(self) -> str:
        return _TYPE_NAMES[self.type] + (" (or null)" if self.optional else "")


def _settings() -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    top = typing.get_type_hints(FitConfig)
    for name in TOP_LEVEL:
        out[name] = _setting(name, top[name])
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = _setting(f"{section}.{f.name}", hints[f.name])
    return out


def _setting(key: str, hint: Any) -> Setting:
    args = typing.get_args(hint)
    plain = [a for a in args if a is not type(None)]
    return Setting(key, plain[0] if plain else hint, type(None) in args)


SETTINGS = _settings()
# Settings whose choices include "yes" and "no" (YAML reads them unquoted as booleans).
_YES_NO = {opt.key for opt in fit_options() if opt.spec.choices and {"yes", "no"} <= set(opt.spec.choices)}


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ConfigFile:
    """The settings a config file gives ("section.field" -> value), checked."""

    path: Path
    values: dict[str, Any]


def read_config_file(path: str | Path) -> ConfigFile:
    """Read and check a config file (or a run directory's config.json); PixelrecError names the problem."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PixelrecError(f"{path}: a directory without config.json; give a .toml, .yaml or .json file "
                                f"or a run directory")
        path = path / "config.json"
    document = _parse(path)
    if not isinstance(document, dict):
        raise PixelrecError(f"{path}: expected a table of settings at the top, got {_kind(document)}")
    if _is_run_record(document):
        document = document["config"]
    return ConfigFile(path, _check_values(path, document))


def _parse(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PixelrecError(f"{path}: unknown config format {suffix or '(no extension)'!r}; "
                            f"expected .toml, .yaml, .yml or .json")
    if not path.is_file():
        raise PixelrecError(f"{path}: config file not found")
    if path.stat().st_size > MAX_BYTES:
        raise PixelrecError(f"{path}: {path.stat().st_size:,} bytes is too large for a config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PixelrecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    fmt = FORMATS[suffix]
    try:
        if fmt == "TOML":
            return tomllib.loads(text)
        if fmt == "JSON":
            return json.loads(text, parse_constant=_no_constant)
        return _load_yaml(path, text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise PixelrecError(f"{path}: not valid {fmt} ({_one_line(exc)})") from None


def _load_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise PixelrecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give the settings "
                            f"as .toml or .json") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(_one_line(exc)) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _is_run_record(document: dict[str, Any]) -> bool:
    """A run's config.json: its settings sit under "config", beside records of the run."""
    return isinstance(document.get("config"), dict) and any(k in document for k in RUN_MARKERS)


def _check_values(path: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The document's settings by key, each of the declared type, choices and bounds."""
    flat: dict[str, Any] = {}
    for name, value in document.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise PixelrecError(f"{path}: {name} must be a table of settings ([{name}]), got {_kind(value)}")
            for field_name, field_value in value.items():
                flat[f"{name}.{field_name}"] = field_value
        else:
            flat[str(name)] = value
    unused = unused_settings(_text(flat.get("items.kind"), "id"), _text(flat.get("items.image_branch"), "frozen"),
                             _text(flat.get("model.model"), "sasrec"))
    options = {opt.key: opt for opt in fit_options()}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        setting = SETTINGS.get(key)
        if setting is None:
            raise PixelrecError(f"{path}: unknown key {key!r}{_suggestion(key)}")
        if value is None:
            if key in unused:
                continue  # a setting this tower / model does not read (config.json writes it as null)
            if not setting.optional:
                raise PixelrecError(f"{path}: {key} is null; expected {setting.expected}")
            values[key] = None
            continue
        value = _typed(path, setting, value)
        if key in options:
            try:
                check_option_value(options[key], value)
            except PixelrecError as exc:
                raise PixelrecError(f"{path}: {key}: {exc}") from None
        values[key] = value
    return values


def _typed(path: Path, setting: Setting, value: Any) -> Any:
    kind = setting.type
    if kind is str and isinstance(value, bool) and setting.key in _YES_NO:
        return "yes" if value else "no"  # YAML reads an unquoted yes / no as a boolean
    fits = (isinstance(value, bool) if kind is bool
            else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
            else isinstance(value, int) and not isinstance(value, bool) if kind is int
            else isinstance(value, str))
    if not fits:
        raise PixelrecError(f"{path}: {setting.key} is {_shown(value)} ({_kind(value)}); expected {setting.expected}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise PixelrecError(f"{path}: {setting.key} is {value}; expected a finite number")
    return value


def _suggestion(key: str) -> str:
    """'; did you mean ...?' for a misspelt key or an option's flag name used as a key."""
    by_flag = {opt.param_name: opt.key for opt in fit_options()}
    name = key.rpartition(".")[2].replace("-", "_")
    if name in by_flag and by_flag[name] != key:
        return f"; did you mean {by_flag[name]!r} (the setting of --{name.replace('_', '-')})?"
    close = difflib.get_close_matches(key, list(SETTINGS), n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; settings are {', '.join(TOP_LEVEL)} and the keys of [{'], ['.join(SECTIONS)}]"


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) else default


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------------------ merging
def apply_config_file(cfg: FitConfig, given: set[str], file: ConfigFile) -> set[str]:
    """Set the file's values on `cfg` except the keys in `given` (options typed on the command line,
    which win); returns the keys now given (the file's count as given for `--preset`)."""
    for key, value in file.values.items():
        if key not in given:
            cfg.set(key, value)
    _check_file_model_settings(cfg.model.model, file)
    return given | set(file.values)


def _check_file_model_settings(model: str, file: ConfigFile) -> None:
    """A setting in the file that the run's sequence model does not read is refused naming the file and
    its key (the same rule as for options, `check_model_options`)."""
    for key in sorted(file.values):
        section, _, name = key.partition(".")
        if section == "model" and name in MODEL_SETTINGS and model not in MODEL_SETTINGS[name]:
            readers = " or ".join(f"--model {m}" for m in MODEL_SETTINGS[name])
            raise PixelrecError(f"{file.path}: [model] {name} is not a setting of --model {model} (it is read by "
                                f"{readers}); remove it from the file")


# ------------------------------------------------------------------------------------ writing
def dump_settings(cfg: FitConfig, fmt: str = "toml") -> str:
    """The settings config.json records (`FitConfig.record`) as a config file fit reads back."""
    record = cfg.record()
    if fmt == "json":
        return json.dumps(record, indent=2) + "\n"
    return to_toml(record)


def to_toml(record: dict[str, Any]) -> str:
    """TOML for a settings record: top-level values, then one table per section; null values are left
    out (TOML has no null; a missing setting takes its default, as null does)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in record.items() if not isinstance(v, dict) and v is not None]
    for section, values in record.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite floats keep their point or exponent (1.0, 1e-05): read back as floats
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    raise TypeError(f"no TOML form for {type(value).__name__}")
