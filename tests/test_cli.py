"""The `pixelrec` command line: help, a full happy path in subprocesses, the error boundary every
command runs in (one-line errors with exit status 2 for bad input, never a traceback), quiet mode,
and the --preset pixelrec settings."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fixtures_runs import (
    TINY_ARGS,
    assert_one_line_error,
    copy_run,
    handmade_dataset,
    invoke,
    run_cli,
    synth_dataset,
    trained_run,
)
from pixelrec import __version__
from pixelrec.cli import PixelrecGroup, cli
from pixelrec.errors import PixelrecError



# ---------------------------------------------------------------------------------------- help
@pytest.mark.smoke
def test_help_of_every_command():
    r = invoke(["--help"], quiet=False)
    assert r.exit_code == 0
    for name in ("synth", "encode", "fit", "evaluate", "retrieve", "index", "demo"):
        assert name in r.stdout
    assert set(cli.commands) >= {"synth", "encode", "fit", "evaluate", "retrieve", "index", "demo"}
    for name in cli.commands:
        r = invoke([name, "--help"], quiet=False)
        assert r.exit_code == 0, (name, r.output)
        assert r.stdout.startswith(f"Usage: cli {name}") or "Usage:" in r.stdout
    fit_help = invoke(["fit", "-h"], quiet=False).stdout
    for flag in ("--interactions", "--out", "--items", "--cache", "--model", "--max-len", "--dim", "--epochs",
                 "--batch-size", "--lr", "--loss", "--device", "--seed", "--resume", "--preset"):
        assert flag in fit_help, flag
    r = invoke(["--version"], quiet=False)
    assert r.exit_code == 0 and __version__ in r.stdout


# ---------------------------------------------------------------------------------------- happy path
@pytest.mark.slow
def test_fit_evaluate_retrieve_in_subprocesses(tmp_path):
    data = handmade_dataset()
    out = tmp_path / "run"
    fit = run_cli(["--quiet", "fit", "--interactions", data.path, "--out", out, *TINY_ARGS, "--epochs", "2",
                   "--json"], quiet_env=False)
    assert fit.returncode == 0, fit.stderr
    assert fit.stderr == ""  # --quiet: no progress bars, no status lines
    summary = json.loads(fit.stdout)
    assert summary["run_dir"] == str(out) and summary["epochs_run"] == 2
    results = json.loads((out / "results.json").read_text())
    assert summary["test"] == results["overall"]

    ev = run_cli(["--quiet", "evaluate", out, "--json"])
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    for part in ("overall", "cold", "warm", "buckets"):
        assert report[part] == results[part]

    user = sorted(data.sequences)[4]
    ret = run_cli(["--quiet", "retrieve", out, "--user", user, "--k", "3", "--json"])
    assert ret.returncode == 0, ret.stderr
    got = json.loads(ret.stdout)
    assert got["user_id"] == user and got["history"] == data.sequences[user]
    assert len(got["items"]) == 3 and not set(got["items"]) & set(data.sequences[user])


def test_progress_shows_unless_quiet(tmp_path):
    data = handmade_dataset()
    r = invoke(["fit", "--interactions", data.path, "--out", tmp_path / "a", *TINY_ARGS, "--epochs", "1"],
               quiet=False)
    assert r.exit_code == 0, r.output
    assert "epoch 0:" in r.output  # progress bar / status lines
    r = invoke(["--quiet", "fit", "--interactions", data.path, "--out", tmp_path / "b", *TINY_ARGS, "--epochs", "1"],
               quiet=False)
    assert r.exit_code == 0
    assert r.stderr == "" and "epoch 0:" not in r.output
    assert r.stdout.startswith(f"{tmp_path / 'b'}: best epoch 0 of 1")


def test_fit_json_is_clean_without_quiet(tmp_path):
    """`fit --json` prints only JSON on stdout; status lines must go to stderr."""
    r = invoke(["fit", "--interactions", handmade_dataset().path, "--out", tmp_path / "run", *TINY_ARGS,
                "--epochs", "1", "--json"], quiet=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs_run"] == 1


def test_pixelrec_quiet_environment_variable_is_honoured():
    """PIXELREC_QUIET=1 silences progress bars (runtime docs) even when --quiet is not given."""
    from click.testing import CliRunner

    from pixelrec.runtime import set_quiet

    run_dir, _ = trained_run()
    try:
        r = CliRunner(env={"PIXELREC_QUIET": "1"}).invoke(cli, ["evaluate", str(run_dir)])
    finally:
        set_quiet(True)
    assert r.exit_code == 0
    assert r.stderr == ""


# ---------------------------------------------------------------------------------------- bad input
def _fit_args(csv, out):
    return ["fit", "--interactions", csv, "--out", out, *TINY_ARGS, "--epochs", "1"]


@pytest.mark.parametrize("name,content,needles", [
    ("missing.csv", None, ["missing.csv", "not found"]),
    ("nocol.csv", "item_id,user_id,time\na,u,1\n", ["nocol.csv", "timestamp"]),
    ("badts.csv", "item_id,user_id,timestamp\na,u,1\nb,u,12.5\nc,u,3\n", ["badts.csv", "row 3", "12.5"]),
    ("empty.csv", "", ["empty.csv", "empty"]),
    ("short.csv", "item_id,user_id,timestamp\na,u,1\nb,u,2\nc,v,1\n", ["short.csv", "at least 3"]),
])
def test_fit_bad_interactions(tmp_path, name, content, needles):
    csv = tmp_path / name
    if content is not None:
        csv.write_text(content)
    r = invoke(_fit_args(csv, tmp_path / "run"))
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert_one_line_error(r.stderr, *needles)
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--dim", "0"], "--dim must be at least 1"),
    (["--items", "frozen"], "--cache"),
    (["--items", "e2e"], "--images"),
    (["--device", "tpu"], "tpu"),
    (["--dim", "15", "--heads", "2"], "not divisible"),
    (["--negatives", "-5"], "--negatives"),
    (["--heads", "0"], "--heads"),
    (["--dropout", "1.5"], "--dropout"),
    (["--lr", "-1"], "--lr"),
])
def test_fit_bad_settings(tmp_path, extra, needle):
    r = invoke(_fit_args(handmade_dataset().path, tmp_path / "run") + extra)
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.stderr, needle)


def test_a_fit_that_fails_at_start_leaves_no_run_behind(tmp_path):
    """Bad settings found while building the model must not leave a config.json that makes the
    corrected command fail with 'already holds a run' (or, with --resume, 'different settings')."""
    csv, out = handmade_dataset().path, tmp_path / "run"
    r = invoke(_fit_args(csv, out) + ["--dim", "15", "--heads", "2"])
    assert r.exit_code == 2
    assert not (out / "config.json").exists()
    r = invoke(_fit_args(csv, out))
    assert r.exit_code == 0, r.output


def test_fit_refuses_existing_run_dir(tmp_path):
    run = copy_run(trained_run()[0], tmp_path / "run")
    r = invoke(_fit_args(synth_dataset().interactions, run))
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(run), "--resume", "--overwrite")
    r = invoke(_fit_args(handmade_dataset().path, run) + ["--resume"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "different data")


def test_run_from_incompatible_version(tmp_path):
    run = copy_run(trained_run()[0], tmp_path / "run")
    meta = json.loads((run / "config.json").read_text())
    meta["pixelrec_version"] = "99.0.0"
    (run / "config.json").write_text(json.dumps(meta))
    user = (run / "users.txt").read_text().split("\n")[0]
    for args in (["evaluate", run], ["retrieve", run, "--user", user], ["index", run],
                 _fit_args(synth_dataset().interactions, run) + ["--resume"]):
        r = invoke(args)
        assert r.exit_code == 2, (args, r.output)
        assert_one_line_error(r.stderr, "99.0.0", str(run))


def test_not_a_run_dir(tmp_path):
    r = invoke(["evaluate", tmp_path])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(tmp_path), "not a pixelrec run directory")
    (tmp_path / "config.json").write_text("{not json")
    r = invoke(["retrieve", tmp_path, "--user", "x"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "config.json")


def test_bad_options_exit_2():
    run_dir, _ = trained_run()
    for args in (["evaluate", run_dir, "--split", "train"], ["fit", "--out", "x"], ["nosuchcommand"]):
        r = invoke(args)
        assert r.exit_code == 2, args


# ---------------------------------------------------------------------------------------- preset
def test_preset_pixelrec_with_explicit_overrides(tmp_path):
    out = tmp_path / "run"
    r = invoke(["fit", "--interactions", handmade_dataset().path, "--out", out, "--preset", "pixelrec",
                "--dim", "16", "--max-len", "4", "--batch-size", "8", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["preset"] == "pixelrec"
    # explicit values win
    assert cfg["model"]["dim"] == 16 and cfg["model"]["max_len"] == 4 and cfg["train"]["batch_size"] == 8
    assert cfg["train"]["epochs"] == 1
    # everything else comes from the preset
    assert cfg["train"]["windows"] == "chunks" and cfg["loss"]["loss"] == "bpr"
    assert cfg["train"]["weight_decay"] == 0.1 and cfg["train"]["lr"] == 1e-4
    assert cfg["train"]["patience"] == 31 and cfg["train"]["encoder_lr"] == 1e-4  # the reference's stopping_step 30
    assert cfg["model"]["layers"] == 2 and cfg["model"]["heads"] == 4 and cfg["model"]["inner_mult"] == 2
    assert cfg["model"]["dropout"] == 0.1 and cfg["model"]["attn_dropout"] == 0.1
    # an id tower reads no image settings: null in config.json; an image tower takes the preset's
    assert cfg["items"]["head"] is None and cfg["items"]["tune_blocks"] is None
    r = invoke(["fit", "--preset", "pixelrec", "--items", "e2e", "--images", "covers", "--print-config", "--json"])
    items = json.loads(r.stdout)["items"]
    assert (items["head"], items["tune_blocks"], items["encoder"]) == ("token_relu_mean", 2, "ViT-B-32-quickgelu")

    report = invoke(["evaluate", out]).stdout
    assert "preset=pixelrec" in report and "loss=bpr" in report

    default = tmp_path / "default"
    r = invoke(["fit", "--interactions", handmade_dataset().path, "--out", default, *TINY_ARGS, "--epochs", "1"])
    assert r.exit_code == 0
    cfg = json.loads((default / "config.json").read_text())["config"]
    assert cfg["preset"] == "default" and cfg["train"]["windows"] == "sliding" and cfg["loss"]["loss"] == "softmax"


# ---------------------------------------------------------------------------------------- error boundary
def toy_cli(raise_it) -> click.Group:
    """A group like `pixelrec`'s, with one command `boom` that calls raise_it()."""

    @click.group(cls=PixelrecGroup)
    def toy() -> None:
        pass

    @toy.command()
    def boom() -> None:
        raise_it()

    return toy


def run_toy(raise_it, env: dict | None = None):
    return CliRunner(env={"PIXELREC_TRACEBACK": None, **(env or {})}).invoke(toy_cli(raise_it), ["boom"])


class OutOfMemoryError(RuntimeError):
    """Named like torch's (torch.OutOfMemoryError), which the boundary recognises without importing torch."""


def _raise(exc: BaseException):
    def raise_it():
        raise exc

    return raise_it


@pytest.mark.parametrize("exc, status, line", [
    (PixelrecError("bad\nthing"), 2, "error: bad thing"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), 2,
     "error: /ro/run: read-only file system; choose a writable location"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/cache.h5"), 2,
     "error: /full/cache.h5: no space left on device; free space and rerun"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "error: /root/x: permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/dir/x"), 2,
     "error: /no/dir/x: no such file or directory"),
    (MemoryError(), 2, "error: out of memory; ask for less (smaller sizes or batches) or use a machine with more memory"),
    (MemoryError("Unable to allocate 23.3 GiB for an array"), 2,
     "error: out of memory (Unable to allocate 23.3 GiB for an array); ask for less (smaller sizes or batches) "
     "or use a machine with more memory"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2, "error: out of memory (CUDA out of memory."),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"), 2,
     "error: out of memory (DefaultCPUAllocator"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("odd\nvalue"), 1, "error: internal error (ValueError: odd value); this is a pixelrec bug — "
                                  "rerun with PIXELREC_TRACEBACK=1 to see the traceback"),
    (AssertionError(), 1, "error: internal error (AssertionError: ); this is a pixelrec bug"),
])
def test_the_boundary_prints_one_line(exc, status, line):
    r = run_toy(_raise(exc))
    assert r.exit_code == status, r.output
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.stderr
    assert "Traceback" not in r.output


def test_an_internal_errors_message_is_kept_short():
    r = run_toy(_raise(ValueError("x" * 5000)))
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1 and len(r.stderr) < 500


def test_pixelrec_traceback_shows_the_traceback():
    r = run_toy(_raise(ValueError("odd")), env={"PIXELREC_TRACEBACK": "1"})
    assert r.exit_code == 1
    assert r.stderr.startswith("Traceback (most recent call last):") and "ValueError: odd" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: internal error (ValueError: odd)")


def test_click_usage_errors_are_one_line_and_exits_pass_through_the_boundary():
    def usage():
        raise click.BadParameter("no good", param_hint="'--thing'")

    r = run_toy(usage)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == "error: toy boom: Invalid value for '--thing': no good (see `toy boom --help`)\n"

    def done():
        click.get_current_context().exit(0)

    assert run_toy(done).exit_code == 0


def test_a_closed_stdout_is_left_to_click():
    r = run_toy(_raise(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert "error:" not in r.output  # click exits quietly (status 1) when the reader of stdout went away


def test_every_command_runs_inside_the_boundary():
    assert isinstance(cli, PixelrecGroup)
    assert set(cli.commands) == {"synth", "encode", "fit", "evaluate", "retrieve", "index", "serve", "compare", "demo"}


def test_no_traceback_from_a_real_process(tmp_path):
    """The installed entry point goes through the same boundary (a target nobody may write to)."""
    r = run_cli(["synth", "/sys/pixelrec-test/data", "--users", "20", "--items", "12", "--cold-items", "2",
                 "--styles", "2", "--min-len", "3", "--max-len", "5", "--image-size", "8"])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert_one_line_error(r.stderr, "/sys/pixelrec-test")


# ---------------------------------------------------------------------------------------- contradictions
def test_resume_and_overwrite_are_refused_together(tmp_path):
    r = invoke(_fit_args(handmade_dataset().path, tmp_path / "run") + ["--resume", "--overwrite"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--resume", "--overwrite")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--cache", "c.h5"], ["--cache", "--items id"]),
    (["--items", "e2e", "--images", "covers", "--cache", "c.h5"], ["--cache", "--items e2e"]),
    (["--items", "frozen", "--cache", "c.h5", "--images", "covers"], ["--images", "--items frozen"]),
])
def test_inputs_the_tower_ignores_are_refused(tmp_path, extra, needles):
    r = invoke(_fit_args(handmade_dataset().path, tmp_path / "run") + extra)
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, *needles)


def test_retrieve_takes_exactly_one_query():
    run_dir, _ = trained_run()
    user = (Path(run_dir) / "users.txt").read_text().split("\n")[0]
    for args in (["--user", user, "--history", "i00001"], ["--user", user, "--users", "all"], []):
        r = invoke(["retrieve", run_dir, *args])
        assert r.exit_code == 2, args
        assert_one_line_error(r.stderr, "exactly one of --user")


def test_no_internal_document_is_cited_to_users():
    import pixelrec.cli

    assert "SPEC §" not in Path(pixelrec.cli.__file__).read_text()
    for name in ("", *cli.commands):
        r = invoke([name, "--help"] if name else ["--help"], quiet=False)
        assert "SPEC" not in r.stdout, name


# ---------------------------------------------------------------------------------------- one name, one meaning
@pytest.mark.parametrize("args, needles", [
    (["fit", "--epoch", "3"], ["error: cli fit: No such option '--epoch'. Did you mean '--epochs'?",
                               "(see `cli fit --help`)"]),
    (["fitt"], ["error: cli: No such command 'fitt'. Did you mean 'fit'?"]),
    (["--no-such-flag", "fit"], ["error: cli: No such option '--no-such-flag'."]),
    (["evaluate"], ["error: cli evaluate: Missing argument 'RUN_DIR'."]),
    (["evaluate", "run", "--split", "train"], ["'--split': 'train' is not one of 'test', 'valid'."]),
    (["compare"], ["error: cli compare: Missing argument 'RUN...'."]),
    (["index", "run", "--k", "many"], ["'--k': 'many' is not a valid integer"]),
])
def test_usage_errors_are_one_line_with_exit_2(args, needles):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert_one_line_error(r.stderr, *needles)


def test_bare_pixelrec_still_shows_its_help():
    r = CliRunner().invoke(cli, [])
    assert "Usage:" in r.output and "Commands:" in r.output


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_subcommand_accepts_quiet(command):
    names = {opt for p in cli.commands[command].params for opt in getattr(p, "opts", [])}
    assert {"-q", "--quiet"} <= names, command


def test_quiet_after_the_subcommand_silences_progress(tmp_path):
    data = handmade_dataset()
    r = invoke(["fit", "--interactions", data.path, "--out", tmp_path / "a", *TINY_ARGS, "--epochs", "1", "-q"],
               quiet=False)
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and "epoch 0:" not in r.output
    assert r.stdout.startswith(f"{tmp_path / 'a'}: best epoch 0 of 1")


def test_evaluate_index_is_the_old_name_of_spec():
    run_dir, _ = trained_run()
    new = invoke(["evaluate", run_dir, "--spec", "Flat", "--json"])
    old = invoke(["evaluate", run_dir, "--index", "Flat", "--json"])
    assert new.exit_code == old.exit_code == 0, old.output
    assert json.loads(old.stdout)["overall"] == json.loads(new.stdout)["overall"]
    assert old.stderr == "note: `evaluate --index` is now `evaluate --spec`; --index will be removed in the next release\n"
    assert "--index" not in invoke(["evaluate", "--help"]).stdout  # hidden
    r = invoke(["evaluate", run_dir, "--index", "Flat", "--spec", "HNSW32"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--index is the old name of --spec: give only --spec")


def test_encode_model_is_the_old_name_of_encoder(tmp_path):
    r = invoke(["encode", "--model", "pixelrec-tiny-vit", "--verify", tmp_path / "c.h5"])
    assert r.exit_code == 2
    note, error = r.stderr.splitlines()
    assert note.startswith("note: `encode --model` is now `encode --encoder`")
    assert error == "error: --verify checks an existing cache and takes no other option; drop --encoder"
    help_text = invoke(["encode", "--help"]).stdout
    assert "--encoder" in help_text and "--model" not in help_text


def test_settings_the_tower_does_not_read_are_null_in_config_json():
    run_dir, _ = trained_run()
    cfg = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    assert cfg["items"]["kind"] == "id"
    assert all(cfg["items"][k] is None for k in ("encoder", "pretrained", "adapter", "dropout", "hybrid", "head"))
    assert cfg["model"]["gru_hidden"] is None and cfg["model"]["heads"] == 1  # sasrec reads heads, not gru_hidden


# ---------------------------------------------------------------------------------------- tensorboard
def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorboard(), reason="the tensorboard package is installed")
def test_tensorboard_without_the_package_is_one_line_before_training(tmp_path):
    r = invoke(_fit_args(handmade_dataset().path, tmp_path / "run") + ["--tensorboard", tmp_path / "tb"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--tensorboard needs the tensorboard package", "pixelrec[tensorboard]")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not _has_tensorboard(), reason="needs the tensorboard package (pixelrec[tensorboard])")
def test_tensorboard_scalars_are_the_epochs_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = invoke(["fit", "--interactions", handmade_dataset().path, "--out", tmp_path / "run", *TINY_ARGS,
                "--epochs", "2", "--tensorboard", tmp_path / "tb"])
    assert r.exit_code == 0, r.output
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "valid/ndcg@10", "valid/recall@10", "time/train_seconds"} <= set(events.Tags()["scalars"])
    for tag, key in (("train/loss", "train_loss"), ("valid/ndcg@10", "valid_ndcg@10")):
        got = [(s.step, s.value) for s in events.Scalars(tag)]
        assert got == [(m["epoch"], pytest.approx(m[key], rel=1e-6)) for m in metrics], tag
