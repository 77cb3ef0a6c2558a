"""Random encoder weights are never silent: `encode` and `fit` print one warning line for a real
encoder on `--pretrained none`, the run's config.json records it, and `evaluate` says so.

pixelrec's tiny test configs are random by design and do not warn (the tests and the demo use them);
config.json still records that their weights are random."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from fixtures_images import cold_dataset, cold_run, image_config, new_covers
from fixtures_runs import trained_run
from pixelrec.encode import encoder as encoder_module
from pixelrec.encode.encoder import TEST_MODELS, EncoderConfig, random_init_warning
from pixelrec.encode.pipeline import EncodeConfig, encode_images
from pixelrec.index.report import format_report
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.runs.fit import fit
from pixelrec.runtime import is_quiet, set_quiet


def _stderr_of(call) -> str:
    """What `call()` logs (progress on, as on the command line without -q)."""
    quiet = is_quiet()
    set_quiet(False)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            call()
    finally:
        set_quiet(quiet)
    return err.getvalue()


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


@pytest.mark.smoke
def test_the_warning_names_real_encoders_on_random_weights_only(tmp_path):
    line = random_init_warning("ViT-B-32", "none")
    assert line.startswith("warning: ViT-B-32 with --pretrained none runs on random weights (a random-init encoder)")
    assert "--pretrained /path/to/checkpoint" in line and "\n" not in line
    assert random_init_warning("RN50", "") is not None
    checkpoint = tmp_path / "ViT-B-32.pt"
    assert random_init_warning("ViT-B-32", str(checkpoint)) is None  # any weights given: no warning
    assert random_init_warning("ViT-B-32", "openai") is None
    assert TEST_MODELS == {"pixelrec-tiny-vit", "pixelrec-tiny-vit-quickgelu", "pixelrec-tiny-rn",
                           "pixelrec-tiny-swin", "pixelrec-tiny-convnext"}
    assert all(random_init_warning(model, "none") is None for model in TEST_MODELS)


def test_encode_warns_once_for_vit_b_32_on_random_weights(tmp_path):
    covers = new_covers()

    def encode(model: str, out: str) -> None:
        encode_images(EncodeConfig(images=str(covers), out=str(tmp_path / out), num_workers=0, device="cpu",
                                   encoder=EncoderConfig(model=model, image_size=32)))

    real = _warnings(_stderr_of(lambda: encode("ViT-B-32", "vit.h5")))
    assert real == [random_init_warning("ViT-B-32", "none")]
    assert _warnings(_stderr_of(lambda: encode("pixelrec-tiny-vit", "tiny.h5"))) == []


def test_fit_warns_and_config_json_records_random_weights(tmp_path, monkeypatch):
    data = cold_dataset()
    # the tiny ViT stands in for a real encoder here (a real one would train for minutes)
    monkeypatch.setattr(encoder_module, "TEST_MODELS", frozenset())
    for kind in ("frozen", "e2e"):
        out = tmp_path / kind
        cfg = image_config(data, out, kind, epochs=1, tune_blocks=1)
        logged = _warnings(_stderr_of(lambda: fit(cfg)))
        assert logged == [random_init_warning("pixelrec-tiny-vit", "none")], kind
        assert json.loads((out / "config.json").read_text())["encoder_random_init"] is True


def test_evaluate_says_random_init_encoder_where_it_applies():
    frozen, _ = cold_run("frozen")  # the tiny ViT on random weights (no warning: a test config)
    meta = json.loads((frozen / "config.json").read_text())
    assert meta["encoder_random_init"] is True
    report = evaluate_run(str(frozen))
    assert report["run"]["encoder_random_init"] is True
    assert "random-init encoder" in format_report(report).splitlines()[0]

    id_run, _ = trained_run()  # no image encoder at all
    assert json.loads((id_run / "config.json").read_text())["encoder_random_init"] is None
    report = evaluate_run(str(id_run))
    assert report["run"]["encoder_random_init"] is None and "random-init" not in format_report(report)
