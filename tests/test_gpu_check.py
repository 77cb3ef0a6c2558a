"""benchmarks/gpu_check.sh --dry-run: the GPU script runs end to end on the CPU at tiny sizes and
writes a JSON and a markdown report with every section (nothing here asserts a speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SECTIONS = ("env", "encode", "fit", "faiss", "pixel200k", "torchrun")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_every_section_ran_and_is_in_the_json(dry_run):
    report = json.loads((dry_run / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        logs = (dry_run / "logs" / f"{name}.log").read_text()
        assert section["status"] == "ok", (name, section["notes"], logs[-2000:])
        assert section["rows"], name
    rows = {name: section["rows"] for name, section in report["sections"].items()}
    assert {r["precision"] for r in rows["encode"]} == {"AMP", "fp32"}
    assert all(r["model_alone_img_s"] > 0 and r["pipeline_img_s"] > 0 for r in rows["encode"])
    assert {(r["tower"], r["precision"]) for r in rows["fit"]} == {
        (t, p) for t in ("partial", "side", "e2e") for p in ("AMP", "fp32")}
    assert {r["index"] for r in rows["faiss"]} == {"Flat", "IVF32,Flat"}
    assert [r for r in rows["faiss"] if r["index"] == "Flat"][0]["recall@10"] == 1.0
    assert {r["stage"] for r in rows["pixel200k"]} >= {"fit-id", "fit-partial"}
    assert rows["torchrun"][0]["processes"] == 2


def test_markdown_has_every_section(dry_run):
    text = (dry_run / "gpu_check.md").read_text()
    assert text.startswith("# GPU check (dry run")
    for name in SECTIONS:
        assert f"| {name} | ok |" in text
        assert f"\n## {name}\n" in text


def test_a_failed_section_is_marked_and_keeps_its_rows(tmp_path):
    """What the script does when a section dies or runs out of time."""
    sections = tmp_path / "sections"
    sections.mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "fit.log").write_text("RuntimeError: CUDA out of memory\n")
    (sections / "fit.json").write_text(json.dumps({"name": "fit", "status": "running", "notes": [],
                                                   "rows": [{"tower": "partial", "s_per_epoch": 1.0}]}))
    helper = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
    subprocess.run(helper + ["failed", "--section", "fit", "--rc", "124", "--out", str(tmp_path)], check=True)
    subprocess.run(helper + ["report", "--out", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    fit = report["sections"]["fit"]
    assert fit["status"] == "timeout" and fit["rows"] == [{"tower": "partial", "s_per_epoch": 1.0}]
    assert "CUDA out of memory" in fit["notes"][-1]
    assert report["sections"]["env"]["status"] == "missing"
    assert "| fit | timeout |" in (tmp_path / "gpu_check.md").read_text()
