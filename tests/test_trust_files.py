"""Files pixelrec reads from elsewhere never run code, and a full disk is one line.

A poisoned checkpoint is a real one plus an object whose unpickling runs a shell command
(`__reduce__` -> os.system("touch MARKER")): loaded with torch.load(weights_only=False) it would
create MARKER. Each entry point that reads a checkpoint (or an encoder's weights) is given one where
it reads it, with the run's manifest digest recomputed (whoever writes the checkpoint can write the
digest too); the command must refuse it in one line naming the file, exit 2, and MARKER must not
exist.

The full-disk tests mount a small tmpfs (root only; skipped where mounting is refused).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

from fixtures_runs import TINY_ARGS, assert_one_line_error, invoke, synth_dataset
from pixelrec.cli_boundary import describe_failure
from pixelrec.encode.checkpoint_check import read_checkpoint
from pixelrec.encode.encoder import TINY_MODEL
from pixelrec.errors import PixelrecError
from pixelrec.runs.rundir import RunDir
from pixelrec.runtime import disk_full_error, file_sha256, is_disk_full, load_tensors


class Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint can do to torch.load(weights_only=False))."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path: Path, marker: Path) -> None:
    """Add the payload to the torch file at `path`, keeping everything it held."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)


def poison_published(run: Path, marker: Path) -> Path:
    """Poison the run's published best checkpoint and recompute the manifest's digest of it."""
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    checkpoint = run / manifest["checkpoint"]
    poison(checkpoint, marker)
    manifest["checkpoint_sha256"] = file_sha256(checkpoint)
    manifest_path.write_text(json.dumps(manifest))
    return checkpoint


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 1-epoch CLI run (so `fit --resume` can be given the same options)."""
    out = tmp_path_factory.mktemp("base") / "run"
    r = invoke(fit_args(out, "--epochs", "1"))
    assert r.exit_code == 0, r.output
    return out


def fit_args(out: Path, *extra: str) -> list:
    return ["fit", "--interactions", synth_dataset().interactions, "--out", out, *TINY_ARGS, *extra]


def test_a_poisoned_file_would_run_its_payload_without_weights_only(tmp_path, base_run):
    """The probe itself: unpickled the old way, the poisoned checkpoint creates the marker."""
    path, marker = tmp_path / "last.pt", tmp_path / "MARKER"
    shutil.copy(base_run / "checkpoints" / "last.pt", path)
    poison(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _user(run: Path) -> str:
    return (run / "users.txt").read_text(encoding="utf-8").split("\n")[0]


def _evaluate(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    return ["evaluate", run], poison_published(run, marker)


def _retrieve(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    return ["retrieve", run, "--user", _user(run)], poison_published(run, marker)


def _serve(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    return ["serve", run, "--port", "0", "--check"], poison_published(run, marker)


def _index(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    """`index` recomputes the item vectors from the checkpoint when the stored ones are gone."""
    for vectors in (run / "index").glob("v*/item_vectors.npy"):
        vectors.unlink()
    return ["index", run, "--spec", "Flat"], poison_published(run, marker)


def _resume(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    poison(run / "checkpoints" / "last.pt", marker)
    return fit_args(run, "--epochs", "2", "--resume"), run / "checkpoints" / "last.pt"


def _init_from(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    return fit_args(tmp / "new", "--epochs", "1", "--init-from", str(run)), poison_published(run, marker)


def _pretrained(run: Path, tmp: Path, marker: Path) -> tuple[list, Path]:
    import open_clip

    weights = tmp / "encoder.pt"
    torch.save(open_clip.create_model(TINY_MODEL).visual.state_dict(), weights)
    poison(weights, marker)
    return ["encode", "--images", synth_dataset().covers, "--out", tmp / "cache.h5", "--encoder", TINY_MODEL,
            "--pretrained", weights, "--device", "cpu"], weights


ENTRY_POINTS = {"evaluate": _evaluate, "retrieve": _retrieve, "serve": _serve, "index": _index,
                "fit --resume": _resume, "fit --init-from": _init_from, "encode --pretrained": _pretrained}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_poisoned_checkpoint_runs_nothing_and_is_refused_in_one_line(tmp_path, base_run, entry):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    marker = tmp_path / "MARKER"
    args, poisoned = ENTRY_POINTS[entry](run, tmp_path, marker)
    r = invoke(args)
    assert not marker.exists(), f"{entry} ran the checkpoint's payload"
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.stderr, str(poisoned), "never unpickles", "posix.system")


def test_a_checkpoint_of_plain_data_still_loads(base_run):
    """What fit writes is tensors and plain data only: both checkpoints load with weights_only=True."""
    run = RunDir(base_run)
    last = load_tensors(run.last, what="checkpoint")
    assert set(last) == {"model", "optimizer", "epoch", "history", "bad_epochs", "best"}
    assert all(isinstance(v, torch.Tensor) for v in last["model"].values())
    best = run.load_checkpoint(run.published().checkpoint, sha256=run.published().checkpoint_sha256)
    assert best["epoch"] == 0 and set(best["model"]) == set(last["model"])


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_a_torchscript_archive_is_read_without_running_it(tmp_path):
    """A TorchScript archive's tensors are read from its data.pkl (never torch.jit.load); an archive
    whose data.pkl references anything but module records, tensors and containers is refused."""
    path = tmp_path / "scripted.pt"
    module = _Module()
    torch.jit.trace(module, torch.ones(1, 3)).save(str(path))
    state, openai = read_checkpoint(path)
    assert openai and set(state) == {"lin.weight", "lin.bias"}
    assert torch.equal(state["lin.weight"], module.lin.weight.detach())

    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                import pickle

                data = pickle.dumps(Payload(marker), protocol=2)
            dst.writestr(name, data)
    with pytest.raises(PixelrecError, match="references posix.system") as info:
        read_checkpoint(evil)
    assert str(evil) in str(info.value) and not marker.exists()


# ------------------------------------------------------------------------------------ full disks
def test_disk_full_is_found_behind_torch_and_faiss_errors():
    """torch.save's and faiss's RuntimeErrors around ENOSPC read as the OSError; other errors do not."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as torch_error:
        assert disk_full_error(torch_error).errno == errno.ENOSPC
    faiss_error = RuntimeError("Error in void faiss::write_index(...) at index_write.cpp:499: Error: 'ret == "
                               "(size * 4)' failed: write error in /data/run/index.faiss: 4051 != 512000 (No space "
                               "left on device)")
    full = disk_full_error(faiss_error)
    assert (full.errno, full.filename) == (errno.ENOSPC, "/data/run/index.faiss")
    assert describe_failure(faiss_error) == (
        "error: /data/run/index.faiss: no space left on device; free space and rerun", 2)
    assert not is_disk_full(RuntimeError("shape mismatch")) and not is_disk_full(OSError(errno.EACCES, "denied"))


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`; skips the test where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: detached even while a file is open


def fill(where: Path, spare: int = 0) -> None:
    """Shrink the tmpfs at `where` to what it holds now plus `spare` bytes (whole pages)."""
    used = int(subprocess.run(["df", "-B1", "--output=used", str(where)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    subprocess.run(["mount", "-o", f"remount,size={max(used + spare, 4096)}", str(where)], check=True)


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): file_sha256(p) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, spare, names", [
    ("fit --resume", 16 << 10, "checkpoints"),  # room for the JSON files, not for a checkpoint (torch.save)
    ("index --spec", 0, "index"),  # faiss.write_index of the new version
])
def test_a_full_disk_is_one_line_and_leaves_the_run_as_it_was(tmp_path, base_run, command, spare, names):
    with tmpfs(tmp_path / "disk", "64m") as disk:
        run = disk / "run"
        shutil.copytree(base_run, run)
        before = _snapshot(run)
        fill(disk, spare)
        args = fit_args(run, "--epochs", "3", "--resume") if command == "fit --resume" else \
            ["index", run, "--spec", "Flat"]
        r = invoke(args)
        assert r.exit_code == 2, r.output
        line = assert_one_line_error(r.stderr, f"{run / names}", "no space left on device")
        assert "bug" not in line and "Traceback" not in r.output
        if command == "index --spec":
            assert _snapshot(run) == before  # nothing half-written, nothing removed
        else:  # config.json (new --epochs) and metrics.jsonl are rewritten whole; checkpoints, index, manifest kept
            rewritten = ("config.json", "metrics.jsonl")
            assert {k: v for k, v in _snapshot(run).items() if k not in rewritten} == \
                {k: v for k, v in before.items() if k not in rewritten}
            assert RunDir(run).read_config()["config"]["train"]["epochs"] == 3
        published = RunDir(run).published()  # still readable
        assert published.checkpoint.is_file() and published.index_dir.is_dir()
        assert not [p for p in run.rglob("*.tmp")]


# ------------------------------------------------------------------------- indexes and caches
def _published_index(run: Path) -> Path:
    return RunDir(run).published().index_dir


def test_an_index_whose_ids_differ_from_its_faiss_id_map_is_refused(tmp_path, base_run):
    import numpy as np

    from pixelrec.index.faiss_index import ItemIndex

    run = shutil.copytree(base_run, tmp_path / "run")
    ids_file = _published_index(run) / "item_ids.npy"
    ids = np.load(ids_file)
    ids[-1] = 10**12  # an id nothing names
    np.save(ids_file, ids)
    with pytest.raises(PixelrecError, match="maps its vectors to other ids than item_ids.npy"):
        ItemIndex.load(_published_index(run))


def test_an_index_with_ids_beyond_the_names_is_refused_before_its_table_is_sized(tmp_path, base_run):
    """A consistent index (FAISS id map = item_ids.npy, digest recomputed) holding id 10**12 would size
    the serving table at 10**12 rows: refused first, naming the index."""
    import numpy as np

    from pixelrec.index.faiss_index import ItemIndex
    from pixelrec.runs.trained import load_trained

    run = shutil.copytree(base_run, tmp_path / "run")
    directory = _published_index(run)
    index = ItemIndex.load(directory)
    ids = np.array(index.ids)
    ids[-1] = 10**12
    shutil.rmtree(directory)
    ItemIndex.build(np.array(index.vectors), ids).save(directory)
    with pytest.raises(PixelrecError, match=f"{directory}: the index holds item ids up to {10**12}"):
        load_trained(str(run))


def test_a_cache_with_non_numeric_top_block_weights_is_refused(tmp_path):
    import h5py

    from fixtures_runs import default_settings_cache
    from pixelrec.encode import open_cache

    path = shutil.copy(default_settings_cache(), tmp_path / "cache.h5")
    with h5py.File(path, "r+") as f:
        key = next(iter(f["top_blocks"]))
        del f["top_blocks"][key]
        f["top_blocks"][key] = "not a tensor"
    with open_cache(path) as cache, pytest.raises(PixelrecError, match=f"top-block weight '{key}' is not a numeric"):
        cache.top_blocks()
