"""The run directory's guarantees under failure and concurrency: one writer at a time, new runs
that appear only whole, a manifest that names one consistent published model, added items that
survive every rebuild, and one-line errors for damaged run files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_images import cold_dataset, cold_run, image_config, load_pixels, new_covers
from fixtures_runs import (
    TINY_ARGS,
    assert_one_line_error,
    cli_env,
    copy_run,
    invoke,
    pixelrec_cmd,
    read_jsonl,
    synth_dataset,
    tiny_config,
    trained_run,
)
from pixelrec.errors import PixelrecError
from pixelrec.index.faiss_index import ItemIndex
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.runs.fit import fit
from pixelrec.runs.item_index import add_images_to_run, rebuild_run_index
from pixelrec.runs.new_items import run_item_encoder
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.trained import load_trained, read_added_items

METRICS = ("overall", "cold", "warm", "buckets")


def _metrics(report: dict) -> dict:
    return {k: report[k] for k in METRICS}


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show a directory was left exactly as it was)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- added items (D1)
def test_added_items_survive_resume_and_index_rebuilds(tmp_path):
    """Items added with `index --add-images` are part of the run: a `fit --resume` that trains on
    re-encodes them through the new tower under the same ids, `index --spec` keeps them, and adding
    the same covers again adds nothing."""
    src, _ = cold_run("frozen")  # 5 epochs
    run = copy_run(src, tmp_path / "run")
    n = len(RunDir(run).read_data().item_ids) - 1
    added = add_images_to_run(str(run), str(new_covers()), workers=0)
    assert (added.added, added.first_id, added.last_id) == (6, n + 1, n + 6)
    names = read_added_items(RunDir(run).published().index_dir)
    assert len(list((run / "added" / "covers").iterdir())) == 6

    cfg = image_config(cold_dataset(), run, "frozen", epochs=7)
    result = fit(cfg, resume=True)
    assert result.epochs_run == 7
    published = RunDir(run).published()
    assert read_added_items(published.index_dir) == names
    index = ItemIndex.load(published.index_dir)
    assert set(index.ids.tolist()) == set(range(1, n + 7))
    # the added items' vectors are the NEW model's function of their covers
    encoder = run_item_encoder(str(run))
    with torch.no_grad():
        want = encoder(load_pixels(encoder, new_covers(), names)).numpy()
    got = index.reconstruct(np.arange(n + 1, n + 7))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert retrieve_one(str(run), history=[names[2]], k=5).history == [names[2]]

    rebuild_run_index(str(run), spec="HNSW16")
    published = RunDir(run).published()
    assert read_added_items(published.index_dir) == names
    assert np.array_equal(ItemIndex.load(published.index_dir).reconstruct(np.arange(n + 1, n + 7)), got)
    again = add_images_to_run(str(run), str(new_covers()), workers=0)
    assert (again.added, again.skipped) == (0, 6)
    r = invoke(["retrieve", run, "--history", names[0], "--k", "3", "--json"])
    assert r.exit_code == 0, r.stderr


# ------------------------------------------------------------------------- overwrite (D2), claim
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_finished_epoch(tmp_path):
    src, _ = trained_run()
    run = copy_run(src, tmp_path / "run")
    before = _tree(run)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("item_id,user_id,timestamp\ni1,u1,1\ni2,u1,notanumber\n")
    with pytest.raises(PixelrecError, match="notanumber"):
        fit(tiny_config(bad_csv, run), overwrite=True)
    assert _tree(run) == before
    # a learning rate that makes training diverge: refused with the epoch and the advice
    with pytest.raises(PixelrecError) as err:
        fit(tiny_config(synth_dataset().interactions, run, lr=1e8, epochs=2), overwrite=True)
    assert "diverged at epoch 0" in str(err.value) and "lower --lr" in str(err.value)
    assert _tree(run) == before
    assert not list(tmp_path.glob(".run.*")), "staging files left beside the run"
    # a good overwrite replaces it
    result = fit(tiny_config(synth_dataset().interactions, run, epochs=1), overwrite=True)
    assert result.epochs_run == 1 and len(read_jsonl(run / "metrics.jsonl")) == 1


def test_a_rejected_new_run_leaves_nothing_and_the_retry_needs_no_overwrite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PixelrecError, match="diverged"):
        fit(tiny_config(synth_dataset().interactions, out, lr=1e8, epochs=2))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert fit(tiny_config(synth_dataset().interactions, out, epochs=1)).epochs_run == 1


def test_out_that_holds_other_files_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(PixelrecError, match="not a pixelrec run directory"):
            fit(tiny_config(synth_dataset().interactions, out, epochs=1), overwrite=overwrite)
    assert _tree(out) == {"notes.txt": b"keep me"}


def test_a_fit_holding_the_run_refuses_a_second_writer(tmp_path):
    """Two fits into one --out: the second is refused at once by name (the first holds the lock);
    `pixelrec index` on a run being trained is refused the same way."""
    out = tmp_path / "run"
    with RunDir(out).lock():
        with pytest.raises(PixelrecError, match="in use by another pixelrec process"):
            fit(tiny_config(synth_dataset().interactions, out, epochs=1))
        assert not out.exists()
    src, _ = trained_run()
    run = copy_run(src, tmp_path / "trained")
    with RunDir(run).lock():
        with pytest.raises(PixelrecError, match="in use"):
            rebuild_run_index(str(run), spec="HNSW16")
        with pytest.raises(PixelrecError, match="in use"):
            fit(tiny_config(synth_dataset().interactions, run, epochs=4), resume=True)
    assert fit(tiny_config(synth_dataset().interactions, out, epochs=1)).epochs_run == 1


def test_two_concurrent_fit_processes_into_one_new_out(tmp_path):
    data = synth_dataset()
    out = tmp_path / "run"
    args = ["--quiet", "fit", "--interactions", str(data.interactions), "--out", str(out), *TINY_ARGS,
            "--patience", "1000"]
    first = subprocess.Popen(pixelrec_cmd() + args + ["--epochs", "400"], env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / ".run.lock").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first fit never took the lock"
            time.sleep(0.02)
        second = subprocess.run(pixelrec_cmd() + args + ["--epochs", "1"], env=cli_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert_one_line_error(second.stderr, str(out), "in use by another pixelrec process", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed first run: either nothing, or a run that resumes; never a mixture
    assert not (out / "results.json").exists()


def test_stale_staging_and_interrupted_replacement_are_repaired(tmp_path):
    """What a fit killed mid-way leaves: a private staging dir (removed by the next fit), or, killed
    between the two renames of --overwrite, the old run set aside (put back by the next fit)."""
    src, _ = trained_run()
    out = tmp_path / "run"
    old = copy_run(src, tmp_path / ".run.replaced-999")
    before = _tree(old)
    (tmp_path / ".run.staging-998").mkdir()
    (tmp_path / ".run.staging-998" / "config.json").write_text("{}")
    with pytest.raises(PixelrecError, match="already holds a run"):
        fit(tiny_config(synth_dataset().interactions, out, epochs=1))  # the restored run is refused as usual
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------------- manifest (W4)
def _finished_copy(tmp_path: Path) -> tuple[Path, dict]:
    src, _ = trained_run()  # 3 epochs
    run = copy_run(src, tmp_path / "run")
    return run, RunDir(run).read_results()


@pytest.mark.parametrize("fail_at", ["index", "results"])
def test_an_interrupted_publication_leaves_the_previous_model_whole(tmp_path, monkeypatch, fail_at):
    """Extending a finished run and being killed while publishing (after the new index version is in
    place, or after results.json but before the manifest): readers keep the previous model's
    checkpoint, index and results together, and the next --resume publishes the new model."""
    import pixelrec.runs.rundir as rundir_module

    run, results = _finished_copy(tmp_path)
    published = RunDir(run).published()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    if fail_at == "index":
        real = RunDir.write_index_version
        monkeypatch.setattr(RunDir, "write_index_version", lambda self, write: killed(real(self, write)))
    else:
        real = rundir_module.write_json
        monkeypatch.setattr(rundir_module, "write_json",
                            lambda path, obj: real(path, obj) if Path(path).name != "manifest.json" else killed())
    cfg = tiny_config(synth_dataset().interactions, run, epochs=6, patience=100)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, resume=True)
    monkeypatch.undo()

    assert RunDir(run).published() == published
    assert _metrics(evaluate_run(str(run))) == _metrics(results)
    if fail_at == "results":  # results.json already holds the unpublished model's metrics: refused
        with pytest.raises(PixelrecError, match="does not belong to the published model"):
            RunDir(run).read_results()
    else:
        assert _metrics(RunDir(run).read_results()) == _metrics(results)
    finished = fit(cfg, resume=True)
    assert finished.epochs_run == 6
    now = RunDir(run).published()
    assert now.version == published.version + 1 and now.best_epoch == finished.best_epoch
    assert _metrics(evaluate_run(str(run))) == _metrics(RunDir(run).read_results())


def test_kill_9_while_extending_a_finished_run_keeps_the_published_model(tmp_path):
    run, results = _finished_copy(tmp_path)
    data = synth_dataset()
    args = ["--quiet", "fit", "--interactions", str(data.interactions), "--out", str(run), *TINY_ARGS,
            "--epochs", "400", "--patience", "1000", "--resume"]
    proc = subprocess.Popen(pixelrec_cmd() + args, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while len(read_jsonl(run / "metrics.jsonl")) < 6:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(read_jsonl(run / "metrics.jsonl")) >= 6  # it trained on past the published epochs
    assert _metrics(evaluate_run(str(run))) == _metrics(results)
    assert _metrics(RunDir(run).read_results()) == _metrics(results)


def test_readers_never_see_half_an_index_while_it_is_rebuilt(tmp_path):
    """A reader loading and searching the run while another process republishes its index 8 times
    sees only whole versions: no error, and the same recommendations throughout."""
    src, _ = trained_run()
    run = copy_run(src, tmp_path / "run")
    user = str(load_trained(str(run)).data.user_ids[4])
    want = retrieve_one(str(run), user=user, k=5).items
    script = ("import sys; from pixelrec.runs.item_index import rebuild_run_index\n"
              "for i in range(8):\n"
              "    rebuild_run_index(sys.argv[1], **({'spec': 'HNSW16', 'ef_search': 200} if i % 2 else {}))\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(run)],
                              env=cli_env(), stderr=subprocess.PIPE, text=True)
    errors, reads = [], 0
    try:
        while writer.poll() is None:
            try:
                got = retrieve_one(str(run), user=user, k=5).items
                reads += 1
                if got != want:
                    errors.append(f"different items {got}")
            except PixelrecError as exc:
                errors.append(str(exc))
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read()
    assert errors == [] and reads > 0
    assert RunDir(run).published().version == 9
    assert len(RunDir(run).index_versions()) == 2  # the published one and the one before it


# ----------------------------------------------------------------------- resume settings
def test_resume_compares_paths_by_what_they_name_and_refuses_fewer_epochs(tmp_path, monkeypatch):
    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    cache = Path(cold_dataset().cache())
    monkeypatch.chdir(cache.parent)
    cfg = image_config(cold_dataset(), run, "frozen", epochs=5, cache=Path("./") / cache.name)
    assert fit(cfg, resume=True).epochs_run == 5  # ./cache.h5 is the run's cache
    with pytest.raises(PixelrecError, match="--epochs 3 but the run has already trained 5 epochs"):
        fit(image_config(cold_dataset(), run, "frozen", epochs=3), resume=True)
    with pytest.raises(PixelrecError, match="give only one"):
        fit(image_config(cold_dataset(), run, "frozen", epochs=6), resume=True, overwrite=True)


# ------------------------------------------------------------------------- damaged run files
def _damaged(tmp_path: Path, damage) -> Path:
    src, _ = trained_run()
    run = copy_run(src, tmp_path / "run")
    damage(run)
    return run


def _null_dim(run: Path) -> None:
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["model"]["dim"] = None
    (run / "config.json").write_text(json.dumps(meta))


def _no_config_section(run: Path) -> None:
    meta = json.loads((run / "config.json").read_text())
    del meta["config"]
    (run / "config.json").write_text(json.dumps(meta))


def _other_shapes(run: Path) -> None:
    path = RunDir(run).published().checkpoint
    state = torch.load(path, weights_only=False)
    state["model"] = {k: torch.cat([v, v]) if v.ndim else v for k, v in state["model"].items()}
    torch.save(state, path)
    manifest = json.loads((run / "manifest.json").read_text())
    from pixelrec.runtime import file_sha256
    manifest["checkpoint_sha256"] = file_sha256(path)  # a consistent manifest: the shapes are what is wrong
    (run / "manifest.json").write_text(json.dumps(manifest))


def _newer_setting(run: Path) -> None:
    """A setting of a later pixelrec (it changes what the model computes): never dropped silently."""
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["model"]["future_setting"] = True
    meta["config"]["train"]["later_null"] = None  # a null one is not read by the model: tolerated
    meta["config"]["train"]["amp"] = False  # a retired setting older runs hold: tolerated (test_loss_choice too)
    (run / "config.json").write_text(json.dumps(meta))


def _latin1_added(run: Path) -> None:
    (RunDir(run).published().index_dir / "added_items.jsonl").write_bytes("\"caf\xe9\"\n".encode("latin-1"))


def _edited_checkpoint(run: Path) -> None:
    path = RunDir(run).published().checkpoint
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize("damage, needles", [
    (_null_dim, ["config.json", "model.dim", "None"]),
    (_no_config_section, ["config.json", "'config'"]),
    (_other_shapes, ["do not fit the settings in config.json", "size mismatch"]),
    (_newer_setting, ["config.json", "model.future_setting", "unknown to pixelrec", "newer version"]),
    (_latin1_added, ["added_items.jsonl", "not UTF-8"]),
    (_edited_checkpoint, ["does not match the run's manifest"]),
])
def test_damaged_run_files_give_one_line_errors(tmp_path, damage, needles):
    run = _damaged(tmp_path, damage)
    user = str(RunDir(trained_run()[0]).read_data().user_ids[0])
    for args in (["evaluate", run], ["retrieve", run, "--user", user]):
        r = invoke(args)
        assert r.exit_code == 2, (args, r.output)
        assert_one_line_error(r.stderr, *needles)


# ------------------------------------------------------------------------------- retrieve input
def test_user_files_and_histories_in_every_encoding_users_meet(tmp_path):
    src, _ = trained_run()
    data = RunDir(src).read_data()
    users = [str(u) for u in data.user_ids[:3]]
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(users).encode() + b"\n")
    r = invoke(["retrieve", src, "--users", bom, "--k", "2"])
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["user_id"] for line in r.stdout.splitlines()] == users
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    r = invoke(["retrieve", src, "--users", latin])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(latin), "not UTF-8")

    items = [str(i) for i in data.item_ids[1:4]]
    want = retrieve_one(str(src), history=items, k=4).items
    hist = tmp_path / "history.txt"
    hist.write_text("\n".join(items) + "\n")
    for args in (["--history-file", hist], ["--history", json.dumps(items)]):
        r = invoke(["retrieve", src, *args, "--k", "4", "--json"])
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["items"] == want
    r = invoke(["retrieve", src, "--history", '["a,b", "c"]'])  # an id holding a comma is one id
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "'a,b'", "'c'")
