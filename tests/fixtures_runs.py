"""Shared tiny datasets and trained runs for the end-to-end tests (fit, evaluate, retrieve, CLI).

Trained runs cost far more than anything else in the suite, so each one is built at most once per
test session, on first use, by a cached builder function (`functools.lru_cache`) under one
temporary root that is removed at exit. They are plain functions rather than pytest fixtures
because the tests call them as functions: from test bodies, from other helpers and from
module-scoped fixtures, and (in `fixtures_images`) with arguments, one run per tower kind and one
cache per pooling and seed. A session-scoped fixture in conftest.py would also be built only once,
but it could not be called from a helper, and taking arguments would need a factory fixture that
every test requests. Because they are lazy, a `pytest -k` selection builds only the runs it uses.
Tests that modify a run work on a copy (`copy_run`).

Import the helpers (`from fixtures_runs import ...`); pytest puts tests/ on sys.path. conftest.py
already makes the session quiet and single-threaded, so runs are fitted with the public
`pixelrec.runs.fit.fit`.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pixelrec.recommend.config import FitConfig
from pixelrec.runs.fit import fit
from pixelrec.runtime import set_quiet

_ROOT: Path | None = None


def session_root() -> Path:
    """A temporary directory shared by the whole test session (removed at interpreter exit)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="pixelrec-e2e-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


# ---------------------------------------------------------------------------------------- configs
TINY = {"dim": 16, "max_len": 8, "layers": 1, "heads": 1}
TINY_ARGS = ["--dim", "16", "--max-len", "8", "--layers", "1", "--heads", "1", "--batch-size", "32",
             "--device", "cpu"]


def tiny_config(interactions, out, *, model: str = "sasrec", loss: str = "softmax", negatives: int = 0,
                epochs: int = 3, batch_size: int = 32, lr: float = 1e-3, patience: int = 10, seed: int = 0,
                min_interactions: int = 3, **model_overrides) -> FitConfig:
    """A FitConfig for a tiny CPU run (id tower)."""
    cfg = FitConfig(interactions=str(interactions), out=str(out))
    for name, value in {**TINY, **model_overrides}.items():
        setattr(cfg.model, name, value)
    cfg.model.model = model
    cfg.loss.loss, cfg.loss.negatives = loss, negatives
    t = cfg.train
    t.epochs, t.batch_size, t.lr, t.patience, t.seed = epochs, batch_size, lr, patience, seed
    t.min_interactions, t.device = min_interactions, "cpu"
    return cfg


# ---------------------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=None)
def synth_dataset():
    """200 users, 80 items (8 cold, only ever final targets), sequences of 5..15 items."""
    from pixelrec.data.synth import SynthConfig, synthesize

    return synthesize(session_root() / "synth", SynthConfig(users=200, items=80, cold_items=8, image_size=16,
                                                            styles=4, min_len=5, max_len=15, seed=1))


@dataclass
class Handmade:
    """A handmade interaction CSV and its ground truth, computed independently of pixelrec."""

    path: Path
    sequences: dict[str, list[str]]  # kept users -> items in time order
    dropped_users: list[str]
    dropped_rows: int
    dropped_items: list[str]
    cold_items: list[str]  # only ever a final (test) interaction
    repeat_user: str  # this user's test target repeats one of their earlier items
    items: list[str] = field(default_factory=list)  # the kept vocabulary, sorted

    def train_counts(self) -> dict[str, int]:
        counts = {i: 0 for i in self.items}
        for seq in self.sequences.values():
            for item in seq[:-2]:
                counts[item] += 1
        return counts


def write_handmade(path: Path, seed: int = 0) -> Handmade:
    """40 kept users over 25 warm + 3 cold items, 2 users too short to split, shuffled rows,
    columns in a non-standard order plus an extra column."""
    rng = np.random.default_rng(seed)
    warm = [f"w{i:02d}" for i in range(25)]
    cold = ["c0", "c1", "c2"]
    seqs: dict[str, list[str]] = {}
    for u in range(40):
        n = int(rng.integers(5, 13))
        seq = [warm[j] for j in rng.choice(len(warm), size=n, replace=False)]
        if u < 9:
            seq[-1] = cold[u % 3]
        seqs[f"u{u:02d}"] = seq
    repeat_user = "u39"
    seqs[repeat_user][-1] = seqs[repeat_user][0]  # the test target was seen before
    dropped = {"d0": ["w00", "x_only_in_dropped"], "d1": ["w01"]}
    rows = []
    for user, seq in list(seqs.items()) + list(dropped.items()):
        base = int(rng.integers(1_000, 9_000)) * 1_000
        rows += [(item, user, base + 10 * t, "5") for t, item in enumerate(seq)]
    order = rng.permutation(len(rows))
    lines = ["user_id,timestamp,rating,item_id"] + [f"{rows[i][1]},{rows[i][2]},{rows[i][3]},{rows[i][0]}" for i in order]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    items = sorted({i for s in seqs.values() for i in s})
    return Handmade(path, seqs, sorted(dropped), sum(len(s) for s in dropped.values()), ["x_only_in_dropped"],
                    cold, repeat_user, items)


@functools.lru_cache(maxsize=None)
def handmade_dataset() -> Handmade:
    return write_handmade(session_root() / "handmade" / "interactions.csv")


# ---------------------------------------------------------------------------------------- runs
@functools.lru_cache(maxsize=None)
def trained_run():
    """(run dir, FitResult): SASRec, full softmax, id tower, 3 epochs on `synth_dataset`."""
    data = synth_dataset()
    out = session_root() / "runs" / "synth_sasrec"
    return out, fit(tiny_config(data.interactions, out, epochs=3))


@functools.lru_cache(maxsize=None)
def handmade_run():
    """(run dir, FitResult): GRU4Rec, BPR, 3 epochs on `handmade_dataset`."""
    data = handmade_dataset()
    out = session_root() / "runs" / "handmade_gru"
    return out, fit(tiny_config(data.path, out, model="gru4rec", loss="bpr", epochs=3, batch_size=16))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- CLI
def invoke(args: list[str], quiet: bool = True, input: str | None = None):
    """Run the click CLI in-process (CliRunner) and restore the session's quiet switch after.

    quiet=True passes `--quiet`; quiet=False runs it as a fresh process without PIXELREC_QUIET would
    (progress on unless ARGS silence it).
    """
    from click.testing import CliRunner

    from pixelrec.cli import cli

    env = None
    if not quiet:
        set_quiet(False)
        env = {"PIXELREC_QUIET": None}
    try:
        return CliRunner(env=env).invoke(cli, (["--quiet"] if quiet else []) + [str(a) for a in args], input=input,
                                         catch_exceptions=False)
    finally:
        set_quiet(True)


def cli_env(quiet_env: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PIXELREC_QUIET"}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    if quiet_env:
        env["PIXELREC_QUIET"] = "1"
    return env


def pixelrec_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("pixelrec")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "pixelrec.cli"]


def run_cli(args: list[str], quiet_env: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `pixelrec ARGS` in a subprocess with one thread."""
    return subprocess.run(pixelrec_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          env=cli_env(quiet_env), timeout=timeout, **kw)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr is exactly one line `error: ...` containing every needle; returns that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def one_error_line(result, *needles: str) -> str:
    """A CliRunner result that failed with exit 2 and printed exactly one line `error: ...` holding every needle."""
    assert result.exit_code == 2, result.output
    return assert_one_line_error(result.output, *needles)


def same_cache(a: Path, b: Path) -> None:
    """Two HDF5 caches hold the same datasets, top-block weights and attributes (`created` aside)."""
    import h5py
    import numpy as np

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert set(fa) == set(fb)
        for name in fa:
            if name != "top_blocks":
                assert np.array_equal(fa[name][()], fb[name][()]), name
        for key in fa["top_blocks"]:
            assert np.array_equal(fa["top_blocks"][key][()], fb["top_blocks"][key][()]), key
        differ = {k for k in fa.attrs if str(fa.attrs[k]) != str(fb.attrs.get(k))}
        assert differ <= {"created"}, differ


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- encoder files
OPENAI_SCALARS = {"input_resolution": 32, "context_length": 8, "vocab_size": 64}  # as OpenAI's JIT state dicts hold


@functools.lru_cache(maxsize=None)
def openai_layout_checkpoint() -> Path:
    """A tiny CLIP (pixelrec-tiny-vit-quickgelu, seeded) saved as OpenAI's checkpoints are laid out: the
    full model's state dict plus OpenAI's scalar entries (what `torch.jit.load(...).state_dict()` of
    OpenAI's ViT-B-32.pt gives)."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        clip = open_clip.create_model("pixelrec-tiny-vit-quickgelu")
    path = session_root() / "openai-layout.pt"
    torch.save({**clip.state_dict(), **{k: torch.tensor(v) for k, v in OPENAI_SCALARS.items()}}, path)
    return path


@functools.lru_cache(maxsize=None)
def default_settings_cache() -> Path:
    """A cache of the synth covers with default encode settings (tiny GELU ViT, model pooling, float16,
    tokens at split block 1): what `--preset pixelrec` must refuse."""
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images

    out = session_root() / "default-settings.h5"
    encode_images(EncodeConfig(images=str(synth_dataset().covers), out=str(out), device="cpu", num_workers=0,
                               encoder=EncoderConfig(model="pixelrec-tiny-vit"), split_block=1))
    return out


@functools.lru_cache(maxsize=None)
def hidden_settings_cache() -> Path:
    """`default_settings_cache` with per-layer states at the even taps (0, 2, 4 of the tiny ViT's 0..4)."""
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images

    out = session_root() / "hidden-settings.h5"
    encode_images(EncodeConfig(images=str(synth_dataset().covers), out=str(out), device="cpu", num_workers=0,
                               encoder=EncoderConfig(model="pixelrec-tiny-vit"), split_block=1, hidden="cls",
                               taps="even"))
    return out


def popularity_ndcg(data) -> float:
    """Test NDCG@10 of ranking by training popularity, each user's history excluded (computed here)."""
    counts = data.train_counts.astype(float).copy()
    counts[0] = -np.inf
    total = 0.0
    for u in range(data.num_users):
        scores = counts.copy()
        scores[data.history(u, "test")] = -np.inf
        rank = int((scores > scores[data.targets("test")[u]]).sum())
        total += 1 / np.log2(rank + 2) if rank < 10 else 0.0
    return total / data.num_users


def assert_two_rank_fit_equals_one(tmp_path: Path, args: list) -> None:
    """`pixelrec fit ARGS` under torchrun with 2 ranks trains the one-process fit's first-epoch loss (1e-5)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixelrec", "--quiet", "fit", *args, "--out", tmp_path / "two"]
    r = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=240,
                       env={**cli_env(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    one = invoke(["fit", *args, "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    got, want = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-5)


def assert_fit_evaluate_retrieve_history(ds, out: Path, model: str, extra: list) -> None:
    """`fit --model MODEL` (2 tiny epochs) on `ds`, then `evaluate` ranks and `retrieve --history` gives 5 items
    outside the history, the same twice (fold-in of users without a learned vector is deterministic)."""
    from pixelrec.data.sequences import load_sequences
    from pixelrec.runs.retrieve import retrieve_one

    r = invoke(["fit", "--interactions", ds.interactions, "--out", out, "--model", model, "--dim", "16",
                "--max-len", "10", "--epochs", "2", "--batch-size", "64", "--device", "cpu", *extra])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["config"]["model"]["model"] == model
    r = invoke(["evaluate", out, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["overall"]["ndcg@10"] > 0
    data = load_sequences(str(ds.interactions))
    history = [str(data.item_ids[i]) for i in data.history(0, "test")[-5:]]
    r = invoke(["retrieve", out, "--history", ",".join(history), "--json", "--k", "5"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(history)
    assert retrieve_one(str(out), history=history, k=5).items == got["items"]
