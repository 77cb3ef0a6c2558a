"""What a hostile or unlucky user leaves in the way (issue 23, part 5): an output path inside the run
a command reads, the shards and locks of a killed sharded encode, temporary files of killed
writers, and special files or outside links in a covers folder.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from fixtures_images import cold_dataset, cold_run, new_covers
from fixtures_runs import copy_run, handmade_run, invoke, one_error_line, same_cache
from pixelrec.distributed import World
from pixelrec.encode import pipeline
from pixelrec.encode.encoder import EncoderConfig
from pixelrec.encode.pipeline import EncodeConfig, encode_images
from pixelrec.errors import PixelrecError
from pixelrec.runs.item_index import rebuild_run_index
from pixelrec.runs.retrieve import retrieve_batch
from pixelrec.runs.rundir import RunDir
from pixelrec.runtime import lock_path_for




def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ outputs inside the run


@pytest.mark.parametrize("target", ["manifest.json", "index/new.jsonl", "nested/dir/x.jsonl"])
def test_retrieve_out_inside_the_run_is_refused_before_anything_is_written(tmp_path, target):
    run = copy_run(handmade_run()[0], tmp_path / "run")
    before = snapshot(run)
    one_error_line(invoke(["retrieve", run, "--users", "all", "--out", run / target]),
                   "--out", "inside the run directory")
    assert snapshot(run) == before
    os.symlink(run, tmp_path / "link")  # a path through a symbolic link to the run is inside it too
    with pytest.raises(PixelrecError, match="inside the run directory"):
        retrieve_batch(str(run), "all", out=str(tmp_path / "link" / "manifest.json"))
    assert snapshot(run) == before
    res = invoke(["retrieve", run, "--users", "all", "--out", tmp_path / "out.jsonl"])  # outside: fine
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.jsonl").read_text().count("\n") == len(RunDir(run).read_data().user_ids)


def test_encode_from_run_refuses_an_out_inside_that_run(tmp_path):
    run = copy_run(cold_run("frozen")[0], tmp_path / "run")
    before = snapshot(run)
    one_error_line(invoke(["encode", "--images", new_covers(), "--from-run", run, "--out", run / "manifest.json"]),
                   "--out", "inside the run directory")
    assert snapshot(run) == before


# ------------------------------------------------------------------------ stale temporary files


def test_temporary_files_of_killed_writers_are_removed_by_the_next_lock_holder(tmp_path):
    run = copy_run(handmade_run()[0], tmp_path / "run")
    stale = [run / ".encode-999999-abc", run / "index" / ".v-xyz.tmp"]
    for directory in stale:
        directory.mkdir()
        (directory / "new.h5.partial").write_bytes(b"\0" * 100)
    stale_files = [run / ".manifest.json.k2j3.tmp", run / "checkpoints" / ".last.pt.abc.pt.tmp"]
    for path in stale_files:
        path.write_bytes(b"half")
    kept = run / "notes.tmp"  # not one of pixelrec's temporary names
    kept.write_text("mine")
    readers_see = snapshot(run)
    invoke(["retrieve", run, "--user", str(RunDir(run).read_data().user_ids[0])])  # a reader removes nothing
    assert snapshot(run) == readers_see
    rebuild_run_index(str(run), spec="Flat")  # takes the run's lock
    assert not any(p.exists() for p in stale + stale_files)
    assert kept.read_text() == "mine"


# ------------------------------------------------------------------------ a killed sharded encode




def _killed_after_two_batches(cfg: EncodeConfig, encoder, monkeypatch) -> None:
    """Encode `cfg` until a kill after its second batch: a partial file of 2 blocks and a lock file."""
    calls, real = [], pipeline._encode_batch

    def encode_batch(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_encode_batch", encode_batch)
    with pytest.raises(KeyboardInterrupt):
        encode_images(cfg, encoder, world=World())
    monkeypatch.setattr(pipeline, "_encode_batch", real)
    lock_path_for(cfg.out).write_text("4242 2026-01-01T00:00:00\n")  # a killed holder's lock file


@pytest.mark.parametrize("second_rank_started", [True, False])
def test_a_one_process_rerun_of_a_killed_two_rank_encode_resumes_the_shards_and_cleans_up(
        tmp_path, monkeypatch, second_rank_started):
    covers = cold_dataset().covers
    base = EncodeConfig(images=str(covers), out=str(tmp_path / "one.h5"), encoder=EncoderConfig(model="pixelrec-tiny-vit"),
                        split_block=2, batch_size=8, num_workers=0, device="cpu")
    one = encode_images(base)
    killed = tmp_path / "killed.h5"
    cfg = dataclasses.replace(base, out=str(killed))
    # what a 2-rank encode killed mid-way leaves: rank 0's shard complete and rank 1's a partial of
    # 2 batches, or (rank 1 not started yet) rank 0's a partial; the ranks' lock files; the cache's lock
    plan = pipeline._plan(cfg, None, resume=False)
    first, second = (pipeline._shard_config(cfg, plan.item_ids, rank, 2, "cpu") for rank in (0, 1))
    if second_rank_started:
        encode_images(first, plan.encoder, world=World())
        _killed_after_two_batches(second, plan.encoder, monkeypatch)
        done = len(first.item_ids) + 2 * cfg.batch_size
    else:
        _killed_after_two_batches(first, plan.encoder, monkeypatch)
        done = 2 * cfg.batch_size
    lock_path_for(killed).write_text("4242 2026-01-01T00:00:00\n")
    assert len(list(tmp_path.glob("killed.h5.shard-*"))) == 1 + second_rank_started

    summary = encode_images(cfg)  # the same command in one process
    assert summary.resumed_from == done and summary.n_encoded == one.n_encoded
    same_cache(tmp_path / "one.h5", killed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "one.h5"]  # no shard, partial or lock left

    # a rerun killed after the merge but before the shards were removed: they are removed now
    shutil.copy(killed, f"{killed}.shard-0-of-2")
    again = encode_images(cfg)
    assert again.already_complete and sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "one.h5"]


def test_shards_of_two_world_sizes_are_refused_by_name(tmp_path):
    out = tmp_path / "c.h5"
    for name in ("c.h5.shard-0-of-2.partial", "c.h5.shard-1-of-3.partial"):
        (tmp_path / name).write_bytes(b"")
    cfg = EncodeConfig(images=str(new_covers()), out=str(out), encoder=EncoderConfig(model="pixelrec-tiny-vit"),
                       num_workers=0, device="cpu")
    with pytest.raises(PixelrecError, match=r"shards of encodes with 2 and 3 ranks .*c\.h5\.shard-1-of-3"):
        encode_images(cfg)
    assert not out.exists()


# ------------------------------------------------------------------------ special files in covers


def test_encode_lists_special_files_and_outside_links_as_failed(tmp_path):
    covers, outside = tmp_path / "covers", tmp_path / "elsewhere"
    shutil.copytree(new_covers(), covers)
    outside.mkdir()
    first = sorted(covers.iterdir())[0]
    shutil.move(first, outside / first.name)
    os.symlink(outside / first.name, covers / first.name)
    os.mkfifo(covers / "pipe.jpg")
    os.symlink(covers / "loop.jpg", covers / "loop.jpg")
    args = ["encode", "--images", covers, "--model", "pixelrec-tiny-vit", "--batch-size", "8", "--workers", "0",
            "--device", "cpu"]
    res = invoke([*args, "--out", tmp_path / "a.h5"])
    assert res.exit_code == 0, res.output
    assert "5 items encoded, 0 failed" in res.output and "3 files in --images cannot be covers" in res.output
    assert f"failed {first.stem}: symbolic link to a file outside the covers folder" in res.output
    assert "failed pipe: a FIFO (named pipe), not a regular file" in res.output
    assert "failed loop: symbolic link loop" in res.output
    res = invoke([*args, "--out", tmp_path / "b.h5", "--follow-symlinks"])
    assert res.exit_code == 0, res.output
    assert "6 items encoded" in res.output and "2 files in --images cannot be covers" in res.output
