"""`fit` end to end (SPEC §4, §5, §8): the run directory, early stopping, refusing and resuming runs,
every sequence model and loss, and the resume contract (kill -9 + --resume == uninterrupted)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_runs import (
    TINY_ARGS,
    cli_env,
    copy_run,
    handmade_dataset,
    handmade_run,
    pixelrec_cmd,
    read_jsonl,
    run_cli,
    synth_dataset,
    tiny_config,
    trained_run,
)
from pixelrec import __version__
from pixelrec.data.sequences import load_sequences
from pixelrec.errors import PixelrecError
from pixelrec.runs.fit import fit
from pixelrec.runs.rundir import RunDir

TIMING = {"seconds", "train_seconds"}


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def _best(out: Path) -> Path:
    """The published (best) checkpoint of a run."""
    return RunDir(out).published().checkpoint


def _index(out: Path) -> Path:
    """The published index version of a run."""
    return RunDir(out).published().index_dir


def _metric_part(report: dict) -> dict:
    return {k: report[k] for k in ("overall", "cold", "warm", "buckets")}


# ---------------------------------------------------------------------------------------- run dir
@pytest.mark.smoke
def test_run_directory_holds_every_artifact():
    out, result = trained_run()
    data = synth_dataset()
    seqs = load_sequences(str(data.interactions))

    meta = json.loads((out / "config.json").read_text())
    assert meta["pixelrec_version"] == __version__
    assert meta["data"]["fingerprint"] == seqs.fingerprint
    assert meta["data"]["users"] == 200 and meta["data"]["items"] == 80
    assert meta["data"]["interactions"] == data.n_interactions
    # every setting is recorded, exactly as given, with the defaults left to the model resolved
    given = tiny_config(data.interactions, out, epochs=3)
    assert given.train.stride == 0
    given.validate()
    assert given.loss.softmax == "auto"
    given.loss.softmax = "full"  # resolved by the cost rule when the model is built: 80 items, full softmax
    assert meta["config"] == given.record()  # settings the id tower does not read are null
    assert meta["config"]["train"]["stride"] == max(1, given.model.max_len // 6)
    assert meta["config"]["model"]["dim"] == 16 and meta["config"]["train"]["epochs"] == 3

    items = (out / "items.txt").read_text().split("\n")[:-1]
    assert items[0] == "[PAD]" and items[1:] == sorted(items[1:]) and len(items) == 81
    users = (out / "users.txt").read_text().split("\n")[:-1]
    assert users == list(seqs.user_ids)
    z = np.load(out / "sequences.npz")
    np.testing.assert_array_equal(z["offsets"], seqs.offsets)
    np.testing.assert_array_equal(z["items"], seqs.items)

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 == result.epochs_run
    history = [json.loads(line) for line in lines]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history:
        for key in ("train_loss", "valid_ndcg@10", "valid_recall@10", "valid_ndcg@20", "seconds", "train_seconds"):
            assert math.isfinite(h[key]), (key, h)
        assert 0 <= h["valid_ndcg@10"] <= h["valid_recall@10"] <= 1
    scores = [h["valid_ndcg@10"] for h in history]
    assert result.best_epoch == int(np.argmax(scores))
    assert result.valid["ndcg@10"] == scores[result.best_epoch]

    best = torch.load(_best(out), weights_only=False)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert best["epoch"] == result.best_epoch and last["epoch"] == 2
    assert last["history"] == history and last["best"]["epoch"] == result.best_epoch

    # the index holds the best checkpoint's item vectors (id tower: the embedding rows 1..N)
    index_files = {p.name for p in _index(out).iterdir()}
    assert {"index.faiss", "index.json", "item_vectors.npy", "item_ids.npy", "added_items.jsonl"} <= index_files
    assert _best(out).name == f"best-e{result.best_epoch:05d}.pt" and _index(out).name == "v0001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted([_best(out).name, "last.pt"])
    np.testing.assert_array_equal(np.load(_index(out) / "item_ids.npy"), np.arange(1, 81))
    np.testing.assert_array_equal(np.load(_index(out) / "item_vectors.npy"),
                                  best["model"]["tower.embedding.weight"][1:].numpy())

    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "test" and results["users"] == 200
    assert results["overall"] == pytest.approx(result.test["overall"])
    assert results["overall"]["users"] == 200 and math.isfinite(results["overall"]["ndcg@10"])
    assert results["published"] == {"version": 1, "checkpoint": str(_best(out).relative_to(out)), "index": "index/v0001"}
    assert RunDir(out).read_results() == results
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), "staging or lock files left beside the run"


def test_dropped_users_are_counted_and_sequences_follow_time():
    out, result = handmade_run()
    hm = handmade_dataset()
    meta = json.loads((out / "config.json").read_text())
    d = meta["data"]
    assert d["dropped_users"] == len(hm.dropped_users) == 2
    assert d["dropped_interactions"] == hm.dropped_rows == 3
    assert d["dropped_items"] == len(hm.dropped_items) == 1
    assert d["users"] == len(hm.sequences) == 40
    assert d["items"] == len(hm.items)
    assert d["interactions"] == sum(len(s) for s in hm.sequences.values())

    items = (out / "items.txt").read_text().split("\n")[:-1]
    users = (out / "users.txt").read_text().split("\n")[:-1]
    assert items[1:] == hm.items and users == sorted(hm.sequences)
    z = np.load(out / "sequences.npz")
    for u, name in enumerate(users):  # rows were shuffled in the file: sequences are in time order
        seq = [items[i] for i in z["items"][z["offsets"][u]:z["offsets"][u + 1]]]
        assert seq == hm.sequences[name], name
    assert result.test["users"] == 40


def test_early_stopping_and_resuming_a_stopped_run(tmp_path):
    hm = handmade_dataset()
    out = tmp_path / "run"
    # lr 0: the weights never change, so valid NDCG@10 never improves after epoch 0
    cfg = tiny_config(hm.path, out, epochs=6, lr=0.0, patience=2, batch_size=16)
    result = fit(cfg)
    assert result.epochs_run == 3 < cfg.train.epochs
    assert result.best_epoch == 0
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["valid_ndcg@10"] == history[1]["valid_ndcg@10"] == history[2]["valid_ndcg@10"]
    _assert_same_weights(_best(out), out / "checkpoints" / "last.pt")

    metrics_before = (out / "metrics.jsonl").read_bytes()
    last_before = (out / "checkpoints" / "last.pt").read_bytes()
    cfg_more = tiny_config(hm.path, out, epochs=20, lr=0.0, patience=2, batch_size=16)
    again = fit(cfg_more, resume=True)
    assert again.epochs_run == 3 and again.best_epoch == 0
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    assert (out / "checkpoints" / "last.pt").read_bytes() == last_before


def test_refuses_an_existing_run_without_resume_or_overwrite(tmp_path):
    hm = handmade_dataset()
    out = copy_run(handmade_run()[0], tmp_path / "run")
    config_before = (out / "config.json").read_bytes()
    cfg = tiny_config(hm.path, out, model="gru4rec", loss="bpr", epochs=1, batch_size=16)
    with pytest.raises(PixelrecError) as err:
        fit(cfg)
    assert str(out) in str(err.value) and "--resume" in str(err.value) and "--overwrite" in str(err.value)
    assert (out / "config.json").read_bytes() == config_before

    result = fit(cfg, overwrite=True)
    assert result.epochs_run == 1
    assert len(read_jsonl(out / "metrics.jsonl")) == 1
    assert json.loads((out / "config.json").read_text())["config"]["train"]["epochs"] == 1
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 0


def test_resume_refuses_other_data_or_settings(tmp_path):
    hm = handmade_dataset()
    out = copy_run(handmade_run()[0], tmp_path / "run")
    base = dict(model="gru4rec", loss="bpr", epochs=3, batch_size=16)

    other = tmp_path / "other.csv"
    lines = hm.path.read_text().splitlines()
    other.write_text("\n".join(lines[:-1]) + "\n")  # one interaction fewer
    with pytest.raises(PixelrecError) as err:
        fit(tiny_config(other, out, **base), resume=True)
    assert "different data" in str(err.value) and str(out) in str(err.value)

    with pytest.raises(PixelrecError) as err:
        fit(tiny_config(hm.path, out, **{**base, "dim": 32}), resume=True)
    assert "model.dim was 16, now 32" in str(err.value)

    with pytest.raises(PixelrecError) as err:
        fit(tiny_config(hm.path, out, **{**base, "loss": "softmax"}), resume=True)
    assert "loss.loss was 'bpr', now 'softmax'" in str(err.value)

    # more epochs is allowed: training continues after the last finished epoch
    result = fit(tiny_config(hm.path, out, **{**base, "epochs": 4}), resume=True)
    assert result.epochs_run == 4
    assert [h["epoch"] for h in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


@pytest.mark.parametrize("model,loss,negatives", [
    ("sasrec", "bpr", 0),
    ("gru4rec", "softmax", 0),
    ("gru4rec", "softmax", 8),
    ("sasrec", "softmax", 8),
])
def test_every_model_and_loss_trains(tmp_path, model, loss, negatives):
    hm = handmade_dataset()
    out = tmp_path / "run"
    result = fit(tiny_config(hm.path, out, model=model, loss=loss, negatives=negatives, epochs=2,
                                    batch_size=16))
    assert result.epochs_run == 2
    for h in read_jsonl(out / "metrics.jsonl"):
        assert math.isfinite(h["train_loss"]) and h["train_loss"] > 0
        assert 0 <= h["valid_ndcg@10"] <= 1
    for key, value in result.test["overall"].items():
        assert math.isfinite(value), key
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["model"]["model"], cfg["loss"]["loss"], cfg["loss"]["negatives"]) == (model, loss, negatives)


def test_resume_in_process_equals_uninterrupted(tmp_path):
    hm = handmade_dataset()
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(model="sasrec", loss="bpr", batch_size=16, patience=50)
    fit(tiny_config(hm.path, a, epochs=2, **kw))
    resumed = fit(tiny_config(hm.path, a, epochs=4, **kw), resume=True)
    straight = fit(tiny_config(hm.path, b, epochs=4, **kw))
    assert _untimed(read_jsonl(a / "metrics.jsonl")) == _untimed(read_jsonl(b / "metrics.jsonl"))
    assert resumed.best_epoch == straight.best_epoch
    _assert_same_weights(_best(a), _best(b))
    _assert_same_weights(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
    assert _metric_part(json.loads((a / "results.json").read_text())) == \
        _metric_part(json.loads((b / "results.json").read_text()))


def test_resume_after_kill_between_checkpoint_and_metrics_of_the_last_epoch(tmp_path):
    """A kill after last.pt of the final epoch is saved but before metrics.jsonl is rewritten:
    --resume has no epoch left to train, and must still leave metrics.jsonl complete (SPEC §8:
    nothing lost)."""
    hm = handmade_dataset()
    out = tmp_path / "run"
    cfg = tiny_config(hm.path, out, epochs=2, batch_size=16)
    fit(cfg)
    complete = (out / "metrics.jsonl").read_text()
    results = json.loads((out / "results.json").read_text())
    # the state such a kill leaves: metrics.jsonl one epoch behind last.pt, nothing published yet
    (out / "metrics.jsonl").write_text(complete.splitlines(keepends=True)[0])
    (out / "results.json").unlink()
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "index")

    result = fit(cfg, resume=True)
    assert result.epochs_run == 2
    assert _metric_part(json.loads((out / "results.json").read_text())) == _metric_part(results)
    assert (out / "metrics.jsonl").read_text() == complete


# ---------------------------------------------------------------------------------------- kill -9
def _epochs_done(out: Path) -> int:
    try:
        return len([line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()])
    except FileNotFoundError:
        return 0


def _kill_after_two_epochs(args: list[str], out: Path, timeout: float = 90) -> bool:
    """Start `pixelrec ARGS`, SIGKILL it once 2 epochs are finished; False if it finished first."""
    proc = subprocess.Popen(pixelrec_cmd() + args, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while _epochs_done(out) < 2:
            if proc.poll() is not None:
                raise AssertionError(f"fit ended before 2 epochs (rc {proc.returncode}): {proc.stderr.read()}")
            if time.time() > deadline:
                raise AssertionError("fit did not finish 2 epochs in time")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode == -signal.SIGKILL and not (out / "results.json").exists()


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    from pixelrec.data.synth import SynthConfig, synthesize

    data = synthesize(tmp_path / "data", SynthConfig(users=300, items=100, cold_items=4, image_size=8, styles=4,
                                                     min_len=5, max_len=30, seed=2))
    for attempt, epochs in enumerate((5, 12, 30)):
        killed, straight = tmp_path / f"killed{attempt}", tmp_path / f"straight{attempt}"
        args = ["--quiet", "fit", "--interactions", str(data.interactions), *TINY_ARGS, "--epochs", str(epochs),
                "--patience", "100", "--seed", "3"]
        # the uninterrupted run of the same command trains beside the one that gets killed
        reference = subprocess.Popen(pixelrec_cmd() + args + ["--out", str(straight)], env=cli_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            was_killed = _kill_after_two_epochs(args + ["--out", str(killed)], killed)
        except BaseException:
            reference.kill()
            raise
        if was_killed:
            break
        reference.kill()
        reference.wait()
    else:
        pytest.fail("fit always finished before it could be killed")

    done = _epochs_done(killed)
    assert 2 <= done < epochs
    assert (killed / "checkpoints" / "last.pt").is_file()
    last = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert done - 1 <= last["epoch"] <= done  # metrics.jsonl is written just after last.pt

    resumed = run_cli(args + ["--out", str(killed), "--resume", "--json"])
    assert resumed.returncode == 0, resumed.stderr
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err

    got, want = read_jsonl(killed / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert len(got) == len(want) == epochs
    assert _untimed(got) == _untimed(want)
    summary = json.loads(resumed.stdout)
    best_straight = int(np.argmax([h["valid_ndcg@10"] for h in want]))
    assert summary["best_epoch"] == best_straight and summary["epochs_run"] == epochs
    _assert_same_weights(_best(killed), _best(straight))
    _assert_same_weights(killed / "checkpoints" / "last.pt", straight / "checkpoints" / "last.pt")
    assert _metric_part(json.loads((killed / "results.json").read_text())) == \
        _metric_part(json.loads((straight / "results.json").read_text()))
    np.testing.assert_array_equal(np.load(_index(killed) / "item_vectors.npy"),
                                  np.load(_index(straight) / "item_vectors.npy"))
    shutil.rmtree(tmp_path / "data")
