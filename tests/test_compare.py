"""`pixelrec compare RUN...`: one table across finished runs from what they recorded (config.json,
results.json through the manifest, metrics.jsonl), its formats and sorting, runs skipped with the
reason, and the validation curves of `--plot`."""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import pytest

from fixtures_runs import (assert_one_line_error, copy_run, handmade_run, invoke, read_jsonl, session_root,
                           synth_dataset, tiny_config, trained_run)
from pixelrec.errors import PixelrecError
from pixelrec.runs.compare import METRIC_COLUMNS, compare_runs
from pixelrec.runs.fit import fit


@functools.lru_cache(maxsize=None)
def second_run() -> Path:
    """A second run on trained_run's data: 2 epochs at another learning rate."""
    out = session_root() / "runs" / "synth_sasrec_lr"
    fit(tiny_config(synth_dataset().interactions, out, epochs=2, lr=3e-3))
    return out


def runs() -> tuple[Path, Path]:
    return trained_run()[0], second_run()


def test_rows_hold_what_the_runs_recorded():
    a, b = runs()
    table = compare_runs([str(a), str(b)])
    assert [r["run"] for r in table.rows] == [str(a), str(b)] and table.skipped == []
    # the settings that differ, and only those, get a column (named as fit's options)
    differing = [c for c in table.columns if c not in ("run", "model", "items", "encoder", *METRIC_COLUMNS,
                                                      "best epoch", "epochs run", "s/epoch", "wall s")]
    assert differing == ["epochs", "lr"]
    for row, run in zip(table.rows, (a, b)):
        results = json.loads((run / "results.json").read_text())
        metrics = read_jsonl(run / "metrics.jsonl")
        manifest = json.loads((run / "manifest.json").read_text())
        assert (row["model"], row["items"], row["encoder"]) == ("sasrec", "id", None)
        assert row["ndcg@10"] == results["overall"]["ndcg@10"]
        assert row["recall@10 warm"] == results["warm"]["recall@10"]
        assert row["ndcg@10 cold"] == results["cold"]["ndcg@10"]
        assert row["epochs run"] == len(metrics) and row["best epoch"] == manifest["best_epoch"]
        assert row["s/epoch"] == pytest.approx(sum(m["train_seconds"] for m in metrics) / len(metrics), abs=1e-4)
        assert row["wall s"] == pytest.approx(sum(m["seconds"] for m in metrics), abs=1e-3)
    assert (table.rows[0]["epochs"], table.rows[1]["epochs"]) == (3, 2)
    assert (table.rows[0]["lr"], table.rows[1]["lr"]) == (1e-3, 3e-3)
    assert [len(table.curves[str(r)]) for r in (a, b)] == [3, 2]


def test_runs_on_other_data_get_a_data_column():
    table = compare_runs([str(trained_run()[0]), str(handmade_run()[0])])
    assert "data" in table.columns and "model" in table.columns
    assert {r["model"] for r in table.rows} == {"sasrec", "gru4rec"}
    assert "heads" not in table.columns  # gru4rec reads no heads (null): no difference by itself


def test_sort_puts_quality_best_first_and_other_columns_ascending():
    a, b = runs()
    by_ndcg = compare_runs([str(a), str(b)], sort="ndcg@10").rows
    assert by_ndcg[0]["ndcg@10"] >= by_ndcg[1]["ndcg@10"]
    assert [r["lr"] for r in compare_runs([str(b), str(a)], sort="lr").rows] == [1e-3, 3e-3]
    with pytest.raises(PixelrecError, match="--sort 'bogus': not a column"):
        compare_runs([str(a)], sort="bogus")


@pytest.mark.parametrize("fmt", ["text", "csv", "markdown", "json"])
def test_formats(fmt):
    a, b = runs()
    r = invoke(["compare", a, b, "--format", fmt])
    assert r.exit_code == 0, r.output
    want = compare_runs([str(a), str(b)])
    out = r.stdout
    if fmt == "json":
        assert json.loads(out) == want.rows
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [float(x["ndcg@10"]) for x in rows] == [w["ndcg@10"] for w in want.rows]
        assert list(rows[0]) == want.columns and rows[0]["encoder"] == ""
    elif fmt == "markdown":
        lines = out.splitlines()
        assert lines[0].startswith("| run | model | items | encoder |") and set(lines[1]) <= set("|- ")
        assert f"| {want.rows[0]['ndcg@10']:.4f} |" in lines[2] and len(lines) == 4
    else:
        header, first, second = out.splitlines()
        assert header.split()[:4] == ["run", "model", "items", "encoder"]
        assert first.startswith(str(a)) and f"{want.rows[1]['ndcg@10']:.4f}" in second


def test_directories_that_are_no_finished_run_are_skipped_with_the_reason(tmp_path):
    a, _ = runs()
    unpublished = copy_run(a, tmp_path / "unpublished")
    (unpublished / "manifest.json").unlink()
    plain = tmp_path / "plain"
    plain.mkdir()
    r = invoke(["compare", a, plain, unpublished, tmp_path / "missing", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert [row["run"] for row in json.loads(r.stdout)] == [str(a)]
    skipped = r.stderr.splitlines()
    assert skipped[0] == f"skipped {plain}: not a pixelrec run directory (no config.json); run `pixelrec fit --out {plain}` first"
    assert skipped[1].startswith(f"skipped {unpublished}: no finished model yet")
    assert skipped[2] == f"skipped {tmp_path / 'missing'}: no such directory"
    r = invoke(["compare", plain, unpublished])
    assert r.exit_code == 2 and r.stdout == ""
    assert_one_line_error("\n".join(l for l in r.stderr.splitlines() if not l.startswith("skipped ")),
                          "no run to compare", str(plain), str(unpublished))


def test_plot_draws_the_validation_curves(tmp_path):
    a, b = runs()
    out = tmp_path / "curves.png"
    r = invoke(["compare", a, b, "--plot", out])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left
    r = invoke(["compare", a, "--plot", tmp_path / "curves.gif"])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "curves.gif", "unknown image format 'gif'")


def test_the_encoder_column_names_the_caches_model():
    from fixtures_images import TINY_VIT, cold_run

    id_run, frozen_run = cold_run("id")[0], cold_run("frozen")[0]
    table = compare_runs([str(id_run), str(frozen_run)])
    assert [(r["items"], r["encoder"]) for r in table.rows] == [("id", None), ("frozen", TINY_VIT)]
    # the frozen tower's settings are null for the id run: no difference, no column
    assert "cache" not in table.columns and "adapter" not in table.columns
