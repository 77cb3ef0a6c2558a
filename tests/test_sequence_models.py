"""NextItNet and LightSANs (models/nextitnet.py, models/lightsans.py) and the model registry
(models/registry.py): causality, padding invariance, the prefix objective, the options a model does
not have, and fit -> evaluate -> retrieve from the command line with the id and frozen towers."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_runs import default_settings_cache, invoke, one_error_line, synth_dataset
from pixelrec.errors import PixelrecError
from pixelrec.recommend.batches import window_bounds
from pixelrec.recommend.config import MODEL_SPECS, FitConfig, SequenceConfig, apply_preset
from pixelrec.recommend.models.lightsans import LightSANs
from pixelrec.recommend.models.nextitnet import NextItNet
from pixelrec.recommend.sequence import build_sequence_encoder

NEW_MODELS = ["nextitnet", "lightsans"]


def encoder(model: str, dim: int = 16, max_len: int = 12, layers: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = SequenceConfig(model=model, dim=dim, max_len=max_len, layers=layers, heads=2, inner_mult=2, dropout=0.0,
                         attn_dropout=0.0, **kw)
    return build_sequence_encoder(cfg).eval()


def padded(history: torch.Tensor, length: int, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """history [n, d] -> x [1, length, d] left-padded with `pad_value`, mask [1, length]."""
    n, d = history.shape
    x = torch.full((1, length, d), pad_value)
    x[0, length - n:] = history
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, length - n:] = True
    return x, mask


def test_registry_builds_each_models_class():
    assert isinstance(encoder("nextitnet"), NextItNet) and isinstance(encoder("lightsans"), LightSANs)
    assert {name: spec.objective for name, spec in MODEL_SPECS.items()} == {
        "sasrec": "causal", "gru4rec": "causal", "nextitnet": "causal", "lightsans": "prefix"}


# ------------------------------------------------------------------------------------- NextItNet
def test_nextitnet_is_causal():
    enc = encoder("nextitnet")
    torch.manual_seed(1)
    x, mask = torch.randn(2, 12, 16), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        before = enc(x, mask)
        for t in (0, 5, 11):
            y = x.clone()
            y[:, t] += 3.0  # a later item changes
            after = enc(y, mask)
            assert torch.equal(after[:, :t], before[:, :t]), t  # earlier states: exactly unchanged
            assert not torch.allclose(after[:, t], before[:, t]), t


def test_nextitnet_blocks_follow_the_dilations():
    """--dilations 1,4 x --layers 3: 6 residual blocks convolving at 1,2,4,8 (x3), so the last state
    sees exactly the 3 * 2 * (1+2+4+8) = 90 items before it and no more."""
    enc = encoder("nextitnet", max_len=100, layers=3, dilations="1,4")
    convs = [(b.conv1.conv.dilation[0], b.conv2.conv.dilation[0]) for b in enc.blocks]
    assert convs == [(1, 2), (4, 8)] * 3
    torch.manual_seed(2)
    x, mask = torch.randn(1, 100, 16), torch.ones(1, 100, dtype=torch.bool)
    with torch.no_grad():
        last = enc(x, mask)[0, -1]
        for t, seen in ((99 - 90, True), (99 - 91, False)):
            y = x.clone()
            y[0, t] += 5.0
            assert torch.allclose(enc(y, mask)[0, -1], last) != seen, t


# ------------------------------------------------------------------------------ both new models
@pytest.mark.parametrize("model", NEW_MODELS)
def test_user_vector_does_not_depend_on_padding(model):
    """The same 5-item history with 1 or 7 padded slots, and padded slots holding garbage (an image
    tower's padding vector is no zero vector): the same user vector."""
    enc = encoder(model)
    torch.manual_seed(3)
    history = torch.randn(5, 16)
    with torch.no_grad():
        short = enc(*padded(history, 6))
        long = enc(*padded(history, 12))
        garbage = enc(*padded(history, 12, pad_value=7.0))
    assert torch.allclose(short[0, -1], long[0, -1], atol=1e-5)
    assert torch.allclose(garbage[0, -1], long[0, -1], atol=1e-5)
    if model == "nextitnet":  # causal: every real position's state is the same
        assert torch.allclose(short[0, 1:], long[0, 7:], atol=1e-5)
    assert torch.isfinite(enc(*padded(history[:0], 12))).all()  # an empty history: no NaN


def test_lightsans_sees_the_whole_window_so_it_trains_on_prefixes():
    enc = encoder("lightsans")
    torch.manual_seed(4)
    x, mask = torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        y = x.clone()
        y[0, -1] = torch.randn(16)  # (a constant shift would vanish in the input LayerNorm)
        assert not torch.allclose(enc(y, mask)[0, 0], enc(x, mask)[0, 0])  # not causal
    # hence its windows: one per prefix, training only the prefix's next item (the last position)
    assert window_bounds(6, 3, "prefixes", 1) == [(0, 2, 1), (0, 3, 1), (0, 4, 1), (1, 5, 1), (2, 6, 1)]
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "lightsans"
    assert (cfg.validate().train.windows, cfg.train.stride) == ("prefixes", 1)
    cfg.train.windows = "chunks"
    with pytest.raises(PixelrecError, match="--windows chunks .* --model lightsans .* use --windows prefixes"):
        cfg.check()


@pytest.mark.parametrize("model, flag, value, owner", [
    ("gru4rec", "--heads", "4", "sasrec or lightsans"),
    ("sasrec", "--dilations", "1,2", "nextitnet"),
    ("nextitnet", "--interests", "2", "lightsans"),
    ("lightsans", "--positions", "absolute", "sasrec"),
    ("lightsans", "--norm", "post", "sasrec"),
])
def test_an_option_the_model_does_not_have_is_refused(tmp_path, model, flag, value, owner):
    r = invoke(["fit", "--interactions", synth_dataset().interactions, "--out", tmp_path / "run", "--model", model,
                flag, value, "--print-config"])
    assert r.exit_code == 2
    one_error_line(r, f"{flag} is not a setting of --model {model}", f"read by --model {owner}")


def test_the_preset_sets_only_the_models_own_settings():
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "nextitnet"
    record = apply_preset(cfg, "pixelrec").validate().record()
    assert record["model"]["dim"] == 1024 and record["model"]["dilations"] == "1,4"
    assert record["model"]["heads"] is None and record["model"]["interests"] is None  # not nextitnet's
    cfg = FitConfig(interactions="i.csv", out="o")
    cfg.model.model = "lightsans"
    record = apply_preset(cfg, "pixelrec").validate().record()
    assert (record["model"]["interests"], record["train"]["windows"], record["model"]["dilations"]) == (3, "prefixes", None)
    assert FitConfig.from_dict(record).model.dilations == "1,4"  # null -> the default again


# ------------------------------------------------------------------------------ from the command line
@pytest.mark.parametrize("model", NEW_MODELS)
@pytest.mark.parametrize("items", ["id", "frozen"])
def test_fit_evaluate_retrieve_from_the_command_line(tmp_path, model, items):
    data = synth_dataset()
    run = tmp_path / "run"
    tower = ["--items", "frozen", "--cache", default_settings_cache()] if items == "frozen" else []
    r = invoke(["fit", "--interactions", data.interactions, "--out", run, "--model", model, *tower, "--dim", "16",
                "--max-len", "8", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["model"]["model"] == model and config["items"]["kind"] == items
    assert config["train"]["windows"] == MODEL_SPECS[model].defaults["train.windows"]

    r = invoke(["evaluate", run, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    # the published index scores the test users as fit did
    assert report["overall"]["ndcg@10"] == pytest.approx(fitted["test"]["ndcg@10"], abs=1e-6)

    item_ids = [line.split(",")[0] for line in data.interactions.read_text().splitlines()[1:4]]
    r = invoke(["retrieve", run, "--history", ",".join(item_ids), "--k", "5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(item_ids)


def test_prefix_windows_train_only_the_last_position():
    from pixelrec.recommend.model import trained_positions

    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])  # windows of max_len 4 (+ the target)
    mask = trained_positions(seq, torch.tensor([1, 1]))
    assert mask.tolist() == [[False, False, False, True]] * 2


def test_two_rank_nextitnet_fit_trains_the_one_process_model(tmp_path):
    """Under torchrun (2 ranks, gloo) the first epoch's loss is the one-process run's."""
    import subprocess
    import sys

    from fixtures_runs import cli_env, read_jsonl

    data = synth_dataset()
    args = ["--interactions", data.interactions, "--model", "nextitnet", "--dim", "16", "--max-len", "8",
            "--batch-size", "32", "--epochs", "1", "--dropout", "0", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixelrec", "--quiet", "fit", *args, "--out", tmp_path / "two"]
    r = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=240,
                       env={**cli_env(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    one = invoke(["fit", *args, "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    got, want = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-5)
