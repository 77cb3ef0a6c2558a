"""Bad input never shows a traceback: for EVERY option and argument of EVERY command, a table of bad
values, each run in-process (click's CliRunner) against otherwise valid arguments, must end with
exit status 2 and exactly one `error:` line.

Adding an option without a row here fails `test_every_option_has_a_row`: give it bad values in
BAD, or list it in NO_BAD_VALUE with the reason. Values are templates filled per test (`{tmp}`, a
fresh directory; `{run}`, a copy of a tiny trained run; see `places`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures_runs import (TINY_ARGS, copy_run, default_settings_cache, handmade_dataset, hidden_settings_cache,
                           openai_layout_checkpoint, synth_dataset, trained_run)
from pixelrec.cli import cli
from pixelrec.runtime import set_quiet

# A place no test may write to, as root too (sysfs refuses new entries): stands for a read-only target.
UNWRITABLE = "/sys/pixelrec-bad-input"


class Args:
    """A bad case given as arguments: added to the command's BASE arguments, or instead of them
    (alone=True) where BASE would get in the way (another query mode, options that clash)."""

    def __init__(self, *args: str, alone: bool = False):
        self.args, self.alone = args, alone

    def __repr__(self) -> str:
        return f"Args{self.args}"


class Known:
    """A bad value that still ends in an internal error in code owned elsewhere: run as a strict
    xfail, so the fix makes it fail until the mark is removed."""

    def __init__(self, value: str | Args, reason: str):
        self.value, self.reason = value, reason


# The arguments every case of a command starts from (valid on their own: test_base_arguments_work).
BASE: dict[str, list[str]] = {
    "synth": ["{tmp}/data", "--users", "20", "--items", "12", "--cold-items", "2", "--styles", "2",
              "--min-len", "3", "--max-len", "5", "--image-size", "8"],
    "encode": ["--images", "{covers}", "--out", "{tmp}/cache.h5", "--encoder", "pixelrec-tiny-vit",
               "--device", "cpu", "--workers", "0"],
    "fit": ["--interactions", "{csv}", "--out", "{tmp}/run", *TINY_ARGS, "--epochs", "1"],
    "evaluate": ["{run}"],
    "retrieve": ["{run}", "--user", "{user}"],
    "index": ["{run}"],
    "serve": ["{run}", "--port", "0", "--check"],  # --check: loads and binds, then exits without serving
    "compare": ["{run}"],
    "demo": ["--workdir", "{tmp}/demo", "--towers", "id", "--epochs", "1", "--users", "30", "--items", "50",
             "--device", "cpu"],
}

E2E = ("--items", "e2e", "--images", "{covers}", "--encoder", "pixelrec-tiny-vit")
FROM_RUN = ("--images", "{covers}", "--out", "{tmp}/cache.h5", "--device", "cpu", "--workers", "0", "--from-run")

# command -> parameter name -> bad values. A plain string is the value of that option (or the
# argument it replaces); Args(...) are extra arguments given as they are.
BAD: dict[str, dict[str, list]] = {
    "synth": {
        "out_dir": ["{file}", "{file}/data", f"{UNWRITABLE}/data", "{foreign}"],
        "users": ["0", "-1", "many", "10000000"],
        "items": ["0", "1", "2000000"],
        "cold_items": ["-1", "11"],
        "seed": ["-1", "99999999999"],
        "image_size": ["0", "4", "5000"],
        "styles": ["0", "100000"],
        "min_len": ["2", "-3"],
        "max_len": ["2", "100000"],
        "style_seed": ["-1"],
        "item_prefix": ["a/b", "a,b", "a\nb", "", ".", "a\\b"],
        "user_prefix": ["u/", "", "u\r", " u"],
    },
    "encode": {
        "images": ["{tmp}/missing", "{file}"],
        "out": ["{tmp}", f"{UNWRITABLE}/cache.h5", "{file}/cache.h5"],
        "interactions": ["{tmp}/missing.csv", "{bad_csv}", "{tmp}"],
        "encoder": ["no-such-model"],
        # the hidden old name of --encoder: refused together with it; alone, it is --encoder (plus a note)
        "old_model": ["pixelrec-tiny-vit",
                      Args("--images", "{covers}", "--out", "{tmp}/cache.h5", "--model", "no-such-model", "--device",
                           "cpu", "--workers", "0", alone=True)],
        "pretrained": ["{tmp}/missing.pt", "{file}",
                       "{openai_pt}",  # OpenAI CLIP weights (QuickGELU) into a GELU tower
                       Args("--encoder", "pixelrec-tiny-rn", "--pretrained", "{openai_pt}")],  # a ViT into a ResNet
        "pooling": ["max"],
        "preset": ["imagenet"],
        "image_size": ["0", "5000"],
        "seed": ["-1"],
        "split_block": ["0", "100",
                        Args("--encoder", "pixelrec-tiny-rn", "--split-block", "5"),  # 4 Bottleneck blocks
                        Args("--encoder", "pixelrec-tiny-swin", "--split-block", "7"),  # 6 Swin blocks
                        Args("--encoder", "pixelrec-tiny-convnext", "--split-block", "6")],  # 5 ConvNeXt blocks
        "batch_size": ["0"],
        "workers": ["-1"],
        "device": ["tpu"],
        "from_run": [Args(*FROM_RUN, "{tmp}", alone=True), Args(*FROM_RUN, "{tmp}/missing", alone=True),
                     Args(*FROM_RUN, "{run}", "--pooling", "mean", alone=True),
                     Args(*FROM_RUN, "{run}", alone=True)],  # an id run has no image tower
        "verify": [Args("--verify", "{tmp}/missing.h5", alone=True), Args("--verify", "{file}", alone=True),
                   Args("--verify", "{file}")],  # with the encoding options: refused
        "precision": ["fp8", "half"],
        "hidden": ["mean", Args("--hidden", "cls+mean", "--encoder", "pixelrec-tiny-rn")],  # a ResNet has no class token
        "taps": [Args("--hidden", "cls", "--taps", "5"),  # the tiny ViT's taps are 0..4
                 Args("--hidden", "cls", "--taps", "0,a"), Args("--taps", "even"),  # --taps without --hidden
                 Args(*FROM_RUN, "{run}", "--hidden", "cls", alone=True)],
    },
    "fit": {
        "config_file": ["{tmp}/missing.toml", "{file}", "{tmp}", "{configs}/unparsable.toml", "{configs}/unknown.toml",
                        "{configs}/wrong_type.yaml", "{configs}/null.json", "{configs}/out_of_range.toml",
                        "{configs}/not_a_table.json"],
        "print_config": [Args("--print-config", "--items", "frozen"),  # resolved settings checked: no --cache
                         Args("--print-config", "--max-len", "4", "--stride", "5", alone=True)],  # no data needed
        "interactions": ["{tmp}/missing.csv", "{tmp}", "{bad_csv}",
                         Args("--out", "{tmp}/run", "--epochs", "1", alone=True)],  # neither here nor in --config
        "out": ["{file}", "{file}/run", f"{UNWRITABLE}/run", "{run}"],
        "items": ["pixels", Args("--items", "frozen"), Args("--items", "e2e")],
        "cache": ["{file}", Args("--items", "frozen", "--cache", "{tmp}/missing.h5"),
                  Args("--items", "frozen", "--cache", "{file}")],
        "images": ["{covers}", Args("--items", "e2e", "--images", "{tmp}/missing")],
        "follow_symlinks": [Args("--follow-symlinks")],  # the id tower has no covers folder
        "encoder": [Args(*E2E, "--encoder", "no-such-model")],
        "pretrained": [Args(*E2E, "--pretrained", "{tmp}/missing.pt"),
                       Args(*E2E, "--pretrained", "{openai_pt}")],  # OpenAI CLIP weights into a GELU tower
        "image_size": ["0", "5000"],
        "tune_blocks": ["-2", Args("--items", "e2e", "--images", "{covers}", "--encoder", "pixelrec-tiny-rn",
                                   "--tune-blocks", "5")],  # beyond the tiny ResNet's 4 blocks
        "adapter": ["deep"],
        "item_dropout": ["1", "-0.1", "nan"],
        "head": ["max"],
        # the encoder's own head is frozen only where a tower trains encoder blocks (partial, e2e)
        "tune_head": [Args("--no-tune-head"), Args("--items", "frozen", "--cache", "{default_cache}", "--no-tune-head")],
        "hybrid": ["product"],
        "image_branch": ["e2e"],
        "id_dropout": ["1", "-0.1", "nan"],
        "hybrid_gate": ["sigmoid"],
        "feature_norm": ["zscore"],
        "image_to_id": ["-1", "nan", "inf"],
        "cache_in_memory": ["maybe"],
        # a cache without per-layer states; taps the cache does not hold; a tap beyond the model's layers
        "side_taps": [Args("--items", "side", "--cache", "{default_cache}"),
                      Args("--items", "side", "--cache", "{hidden_cache}", "--side-taps", "1"),
                      Args("--items", "side", "--cache", "{hidden_cache}", "--side-taps", "0,7"),
                      Args("--items", "side", "--cache", "{hidden_cache}", "--side-taps", "x"),
                      Args("--side-taps", "even")],  # the id tower has no side network
        "side_dim": ["0", Args("--items", "frozen", "--cache", "{default_cache}", "--side-dim", "8")],
        "side_residual": [Args("--side-residual")],
        "model": ["caser", Args("--model", "vbpr"),  # vbpr reads the frozen cache
                  Args("--model", "acf"),  # acf reads the cached tokens
                  Args("--model", "visrank"),  # visrank reads the cached embeddings
                  Args("--model", "vbpr", "--items", "frozen", "--cache", "{default_cache}", "--adapter", "mlp")],
        "dim": ["0", "-4", Args("--dim", "15", "--heads", "2")],
        "max_len": ["0"],
        "layers": ["0"],
        "heads": ["0", "3", Args("--model", "gru4rec", "--heads", "2")],  # a setting gru4rec does not have
        "dilations": [Args("--model", "nextitnet", "--dilations", "1,0"), Args("--model", "nextitnet", "--dilations", "a"),
                      Args("--dilations", "1,4")],  # sasrec has no dilations
        "interests": [Args("--model", "lightsans", "--interests", "0"), Args("--interests", "3")],
        "mask_ratio": [Args("--model", "bert4rec", "--mask-ratio", "1.5"), Args("--model", "bert4rec", "--mask-ratio", "nan"),
                       Args("--mask-ratio", "0.3")],  # sasrec has no cloze objective
        "mask_last": [Args("--model", "bert4rec", "--mask-last", "-0.1"), Args("--mask-last", "0.5")],
        "bert_head": [Args("--no-bert-head")],  # sasrec has no output head option
        "item_bias": [Args("--item-bias")],  # sasrec has no item bias (yet)
        "visrank_k": [Args("--model", "visrank", "--items", "frozen", "--cache", "{default_cache}", "--visrank-k", "0"),
                      Args("--visrank-k", "2")],  # sasrec has no visrank k
        "dssm_mlp": [Args("--model", "dssm", "--dssm-mlp", "64,0"), Args("--model", "dssm", "--dssm-mlp", "x"),
                     Args("--dssm-mlp", "64")],  # sasrec has no user MLP
        "context": [Args("--model", "fm", "--context", "both"), Args("--context", "window"),  # sasrec: no such setting
                    Args("--model", "dssm", "--context", "window", "--windows", "prefixes")],
        "dropout": ["1.5", "nan", "-inf"],
        "attn_dropout": ["1.5", "nan", "-inf"],
        "positions": ["rotary"],
        "norm": ["sandwich"],
        "negatives_from": ["test"],
        "mean_over": ["users"],
        "precision": ["fp8"],
        "decay_groups": ["none"],
        "ties": ["first"],
        "loss": ["hinge"],
        "softmax": ["maybe", Args("--softmax", "full", "--negatives", "8"),
                    Args("--softmax", "sampled", "--loss", "bpr")],
        "negatives": ["-5"],
        "epochs": ["0", "ten"],
        "batch_size": ["0"],
        "lr": ["nan", "inf", "-1"],
        "weight_decay": ["nan", "-1"],
        "encoder_lr": ["inf", "-1"],
        "encoder_weight_decay": ["nan", "-0.5"],
        "patience": ["0"],
        "windows": ["overlap", Args("--model", "lightsans", "--windows", "sliding"),  # not causal: prefixes only
                    Args("--model", "srgnn", "--windows", "chunks"),
                    Args("--model", "bert4rec", "--windows", "sliding"),  # cloze hides items anywhere in a window
                    Args("--windows", "prefixes", "--stride", "3")],
        "stride": ["-1", "9", Args("--windows", "chunks", "--stride", "3"),  # chunks have no stride
                   Args("--preset", "pixelrec", "--stride", "3")],  # the preset's SASRec windows are chunks
        "seed": ["-1", str(2**40)],
        "device": ["tpu"],
        "min_interactions": ["2"],
        "preset": ["sasrec2018",
                   # a cache of other settings than the reference's (preprocessing, pooling, dtype, GELU, split)
                   Args("--preset", "pixelrec", "--items", "partial", "--cache", "{default_cache}"),
                   Args("--preset", "pixelrec", "--items", "frozen", "--cache", "{default_cache}")],
        "init_from": ["{tmp}", "{tmp}/missing"],
        "resume": [Args("--resume", "--overwrite")],
        # a file; a place nobody may write to (or, without the tensorboard package, refused for that)
        "tensorboard_dir": ["{file}", f"{UNWRITABLE}/tb"],
    },
    "evaluate": {
        "run_dir": ["{tmp}", "{tmp}/missing", "{file}"],
        "split": ["train"],
        "ks": ["0", "a,b", ",", "-5"],
        "index_spec": ["Garbage"],
        "old_index": ["Garbage", Args("--index", "HNSW32", "--spec", "Flat")],  # the hidden old name of --spec
        "nprobe": ["0", Args("--nprobe", "4")],
        "ef_search": ["0", Args("--ef-search", "16")],
        "negatives": ["-5"],
        "cold_threshold": ["-1"],
        "seed": ["-1"],
        "device": ["tpu"],
        "batch_size": ["0", "-3"],
        "gpu_shards": ["mirror"],
    },
    "retrieve": {
        "run_dir": ["{tmp}", "{tmp}/missing", "{file}"],
        "user": ["nobody", Args("--history", "{item}")],
        "history": [Args("{run}", "--history", "nosuchitem", alone=True), Args("{run}", "--history", ",", alone=True)],
        "history_file": [Args("{run}", "--history-file", "{tmp}/missing.txt", alone=True),
                         Args("{run}", "--history-file", "{file}", alone=True)],
        "users_file": [Args("{run}", "--users", "{tmp}/missing.txt", alone=True), Args("--users", "{users_txt}")],
        "k": ["0", "-1"],
        "out": ["{tmp}/top.jsonl",
                Args("{run}", "--users", "{users_txt}", "--out", f"{UNWRITABLE}/top.jsonl", alone=True),
                Args("{run}", "--users", "{users_txt}", "--out", "{file}/top.jsonl", alone=True),
                Args("{run}", "--users", "{users_txt}", "--out", "{tmp}", alone=True),
                Args("{run}", "--users", "{users_txt}", "--out", "{run}/manifest.json", alone=True)],  # inside the run
        "device": ["tpu"],
        "batch_size": ["0", "-3"],
        "html_out": ["{run}/page.html",  # inside the run
                     f"{UNWRITABLE}/page.html", "{file}/page.html", "{tmp}",
                     Args("{run}", "--users", "{users_txt}", "--html", "{tmp}/p.html", "--out", "{tmp}/t.jsonl",
                          alone=True),
                     Args("--html", "{tmp}/p.html", "--json")],
        "images": [Args("--images", "{tmp}"),  # without --html
                   Args("--html", "{tmp}/p.html", "--images", "{tmp}/missing")],
    },
    "index": {
        "run_dir": ["{tmp}", "{tmp}/missing", "{file}"],
        "spec": ["Garbage"],
        "metric": ["l2"],
        "nprobe": ["0"],
        "ef_search": ["0"],
        "add_images": ["{tmp}/missing", "{file}", "{new_covers}",  # an id run has no image tower
                       Args("--add-images", "{new_covers}", "--spec", "HNSW32")],
        "follow_symlinks": [Args("--follow-symlinks")],  # without --add-images
        "target_recall": ["0", "1.5", "nan", "-0.1", "inf", Args("--target-recall", "0.9", "--spec", "HNSW32"),
                          Args("--target-recall", "0.9", "--k", "100000")],  # k above the catalogue
        "k": ["0", "-3", "5"],  # 5: --k without --target-recall
        "sample": ["1", "many", "50"],  # 50: --sample without --target-recall
        "device": ["tpu"],
    },
    "serve": {
        "run_dir": ["{tmp}", "{tmp}/missing", "{file}"],
        "host": ["", "192.0.2.1"],  # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind fails at once
        "port": ["-1", "65536", "http"],
        "device": ["tpu"],
        "workers": ["0", "many"],
        "batch_window_ms": ["-1", "nan", "inf", "5000"],
        "max_batch": ["0"],
        "max_upload_mb": ["0", "-5", "nan"],
        "max_upload_files": ["0", "many"],
        "api_key_file": ["{tmp}/missing", "{tmp}", "{file}"],  # {file}: readable by other users (or holds spaces)
        "max_connections": ["0"],
        "body_timeout_s": ["0", "-1", "nan"],
        "images": ["{tmp}/missing", "{tmp}"],  # {tmp}: a folder without covers
    },
    "compare": {
        "run_dirs": ["{tmp}", "{tmp}/missing", "{file}", "{unpublished}"],  # the last: a run without results
        "fmt": ["xml"],
        "sort": ["bogus"],
        "plot": ["{tmp}/curves.gif", f"{UNWRITABLE}/curves.png", "{file}/curves.png",
                 "{run}/added/covers/1.png"],  # inside a run it reads
    },
    "demo": {
        "workdir": ["{file}", f"{UNWRITABLE}/demo"],
        "towers": ["pixels", ","],
        "epochs": ["0"],
        "users": ["0", "100000000"],
        "items": ["0", "3"],
        "seed": ["-1"],
        "device": ["tpu"],
    },
}

# Parameters that have no bad value (flags; free text whose every value is valid), with the reason.
FLAG = "a flag: given or not, both are valid"
NO_BAD_VALUE: dict[str, dict[str, str]] = {
    "": {"quiet": FLAG, "version": "prints the version and exits"},
    "synth": {"lmdb": FLAG, "quiet": FLAG},
    "encode": {"float32": FLAG, "normalize": FLAG, "skip_missing": FLAG, "overwrite": FLAG, "quiet": FLAG,
               "follow_symlinks": FLAG},
    "fit": {"grad_checkpointing": FLAG, "deterministic": FLAG, "as_json": FLAG, "quiet": FLAG,
            "overwrite": "a flag; its only bad use, with --resume, is the `resume` row"},
    "evaluate": {"as_json": FLAG, "quiet": FLAG},
    "retrieve": {"as_json": FLAG, "quiet": FLAG},
    "index": {"quiet": FLAG},
    "serve": {"check_only": FLAG, "quiet": FLAG, "read_only": FLAG},
    "compare": {"quiet": FLAG},
    "demo": {"quiet": FLAG},
}


def _cases():
    for command, table in BAD.items():
        for param, values in table.items():
            for i, value in enumerate(values):
                case_id = f"{command}-{param}-{i}"
                if isinstance(value, Known):
                    yield pytest.param(command, param, value.value, id=case_id,
                                       marks=pytest.mark.xfail(strict=True, reason=value.reason))
                else:
                    yield pytest.param(command, param, value, id=case_id)


# ---------------------------------------------------------------------------------------- places
@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    """What the templates name: fresh paths under tmp_path, tiny data and a copy of a trained run."""
    work = tmp_path / "work"
    work.mkdir()
    file = tmp_path / "a-file.txt"
    file.write_text("not what was asked for\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's\n")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("item_id,user_id,time\na,u,1\n")
    run = copy_run(trained_run()[0], tmp_path / "run")
    user = (run / "users.txt").read_text().split("\n")[0]
    item = (run / "items.txt").read_text().split("\n")[1]
    users_txt = tmp_path / "users.txt"
    users_txt.write_text(f"{user}\n")
    new_covers = tmp_path / "new_covers"  # the cover of an item no run knows
    new_covers.mkdir()
    shutil.copy(next(Path(synth_dataset().covers).iterdir()), new_covers / "new00001.jpg")
    unpublished = copy_run(trained_run()[0], tmp_path / "unpublished")  # a run whose fit never published
    (unpublished / "manifest.json").unlink()
    configs = tmp_path / "configs"  # config files for `fit --config`, each bad in one way
    configs.mkdir()
    for name, text in CONFIG_FILES.items():
        (configs / name).write_text(text)
    return {"unpublished": str(unpublished), "configs": str(configs), "tmp": str(work), "file": str(file), "foreign": str(foreign), "bad_csv": str(bad_csv),
            "csv": str(handmade_dataset().path), "covers": str(synth_dataset().covers), "run": str(run),
            "user": user, "item": item, "users_txt": str(users_txt), "new_covers": str(new_covers),
            "openai_pt": str(openai_layout_checkpoint()), "default_cache": str(default_settings_cache()),
            "hidden_cache": str(hidden_settings_cache())}


CONFIG_FILES = {
    "unparsable.toml": "[model\ndim = 16\n",
    "unknown.toml": "[model]\ndims = 16\n",
    "wrong_type.yaml": "train:\n  epochs: ten\n",
    "null.json": '{"model": {"dim": null}}',
    "out_of_range.toml": "[model]\ndropout = 1.5\n",
    "not_a_table.json": '{"train": [1, 2]}',
}


def _fill(args, places: dict[str, str]) -> list[str]:
    return [a.format(**places) for a in args]


def _arguments(command: str) -> list[str]:
    return [p.name for p in cli.commands[command].params if p.param_type_name == "argument"]


def _args_for(command: str, param: str, value, places: dict[str, str]) -> list[str]:
    base = _fill(BASE[command], places)
    if isinstance(value, Args):
        return _fill(value.args, places) if value.alone else base + _fill(value.args, places)
    filled = value.format(**places)
    if param in _arguments(command):  # replace the positional argument (always first in BASE here)
        return [filled] + base[1:]
    option = next(p for p in cli.commands[command].params if p.name == param)
    return base + [max(option.opts, key=len), filled]


def _run(command: str, args: list[str]):
    try:
        return CliRunner(env={"PIXELREC_TRACEBACK": None}).invoke(cli, ["--quiet", command, *args])
    finally:
        set_quiet(True)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lower().startswith("error:")]


# ---------------------------------------------------------------------------------------- tests
def test_every_option_has_a_row():
    """A new option (or argument) without bad values here, or a reason why it has none, fails."""
    commands = {"": cli, **cli.commands}
    assert set(commands) == set(NO_BAD_VALUE), "add the new command to BAD, BASE and NO_BAD_VALUE"
    for name, command in commands.items():
        params = {p.name for p in command.params}
        listed = set(BAD.get(name, {})) | set(NO_BAD_VALUE[name])
        assert not set(BAD.get(name, {})) & set(NO_BAD_VALUE[name]), name
        missing, stale = params - listed, listed - params
        assert not missing, f"`{name or 'pixelrec'}`: give {sorted(missing)} bad values in BAD or a reason in NO_BAD_VALUE"
        assert not stale, f"`{name or 'pixelrec'}`: {sorted(stale)} are no longer parameters; remove their rows"
        for param, values in BAD.get(name, {}).items():
            assert values, f"{name} {param}: no bad values listed"


@pytest.mark.parametrize("command", list(BASE))
def test_base_arguments_work(command, places):
    """Every case starts from arguments that work, so each failure below is the bad value's doing."""
    r = _run(command, _fill(BASE[command], places))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command, param, value", list(_cases()))
def test_bad_value_gives_one_error_line(command, param, value, places):
    args = _args_for(command, param, value, places)
    r = _run(command, args)
    detail = f"pixelrec {command} {' '.join(map(repr, args))}\n{r.output}"
    assert "Traceback" not in r.output, detail
    assert r.exception is None or isinstance(r.exception, SystemExit), detail
    assert r.exit_code == 2, detail
    assert len(_error_lines(r.output)) == 1, detail
    assert "Usage:" not in r.output, detail  # click's usage errors too: one line, not click's three
