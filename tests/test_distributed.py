"""pixelrec under torchrun: 2 ranks on CPU (gloo), tiny models.

What is compared, and why not more exactly:
- DDP training computes the gradient one process computes with the same global batch: the loss is
  normalised by the global batch's trained positions, negatives come from the same generator, and
  the sampled softmax's candidates are the whole batch's. Gradients agree to float rounding (their
  sums run in another order), which `test_gradient_of_one_global_batch_equals_one_process` checks
  to 1e-5. Whole fits are not compared parameter by parameter: Adam divides each gradient by its
  own magnitude, so a coordinate whose gradient is at rounding level (1e-9 next to 1e-2) moves by
  +lr or -lr depending on its last bit, in either run; what stays equal is the loss (checked to 1e-5).
- Sharded encoding encodes exactly the one-process batches (shards are cut at batch boundaries),
  so the merged cache equals the one-process cache bit for bit.
- Sharded evaluation and retrieval encode and search the one-process batches of users, so the
  report and the JSONL are identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_gradient import batch_gradient
from fixtures_images import cold_dataset
from fixtures_runs import TINY_ARGS, assert_one_line_error, cli_env, read_jsonl, same_cache, synth_dataset, trained_run
from pixelrec import distributed
from pixelrec.encode.pipeline import EncodeConfig, encode_images
from pixelrec.encode.encoder import EncoderConfig
from pixelrec.encode.shards import check_no_foreign_shards
from pixelrec.errors import PixelrecError
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.runs.fit import fit
from pixelrec.runs.retrieve import retrieve_batch
from pixelrec.runs.rundir import RunDir

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


def torchrun(args: list, nproc: int = 2, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS` (one thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=cli_env(),
                          timeout=timeout, **kw)


def start_torchrun(args: list, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.Popen(cmd + [str(a) for a in args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of rank `rank` among the workers torchrun started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                status = (proc / "status").read_text()
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


def tiny_fit_args(interactions, out, *extra) -> list:
    return ["-m", "pixelrec", "--quiet", "fit", "--interactions", interactions, "--out", out, *TINY_ARGS,
            "--dropout", "0", "--attn-dropout", "0", *extra]


# ---------------------------------------------------------------------------------------- fit
def _spec(interactions, kind: str = "id", loss: str = "softmax", negatives: int = 0, model: str = "sasrec",
          **items) -> dict:
    from fixtures_runs import tiny_config

    cfg = tiny_config(interactions, "unused", model=model, loss=loss, negatives=negatives, dropout=0.0,
                      attn_dropout=0.0)
    cfg.items.kind = kind
    for key, value in items.items():
        setattr(cfg.items, key, value)
    return cfg.to_dict()


def test_gradient_of_one_global_batch_equals_one_process(tmp_path):
    synth, images = synth_dataset(), cold_dataset()
    specs = [_spec(synth.interactions),  # id tower, full softmax
             _spec(synth.interactions, loss="bpr"),  # negatives drawn for the whole batch
             _spec(synth.interactions, negatives=32),  # sampled softmax: the whole batch's targets as candidates
             _spec(synth.interactions, model="mf"),  # each rank's windows with their users' vectors
             _spec(images.interactions, kind="partial", cache=str(images.cache()))]  # candidates encoded in shares
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    r = torchrun([TESTS / "ddp_gradient.py", tmp_path / "specs.json", tmp_path / "grads.pt"])
    assert r.returncode == 0, r.stderr
    for spec, (loss2, grads2) in zip(specs, torch.load(tmp_path / "grads.pt")):
        loss1, grads1 = batch_gradient(spec)
        assert loss2 == pytest.approx(loss1, rel=1e-5)
        assert grads1.keys() == grads2.keys()
        for key, g in grads1.items():
            assert torch.allclose(grads2[key], g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-12), key


def test_two_rank_fit_trains_the_one_process_model(tmp_path):
    data = synth_dataset()
    two = tmp_path / "two"
    r = torchrun(tiny_fit_args(data.interactions, two, "--epochs", "2", "--json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"run_dir"') == 1  # rank 0 alone prints the summary
    from fixtures_runs import tiny_config

    one = fit(tiny_config(data.interactions, tmp_path / "one", epochs=2, dropout=0.0, attn_dropout=0.0))
    got, want = read_jsonl(two / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    # epoch 0 from the same weights: equal to rounding; epoch 1 after Adam steps (see the module doc)
    assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-5)
    assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in want], rel=1e-4)
    assert got[0]["valid_ndcg@10"] == pytest.approx(want[0]["valid_ndcg@10"], abs=0.02)
    published = RunDir(two).published()
    assert published.best_epoch in (0, 1) and RunDir(two).read_results()["users"] == one.test["users"]
    assert not list(tmp_path.glob(".two.*")), "lock or staging left beside the run"


def test_killed_rank_stops_the_job_and_one_process_resumes_it(tmp_path):
    data = synth_dataset()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    epochs = ["--epochs", "4", "--patience", "100"]
    reference = start_torchrun(tiny_fit_args(data.interactions, straight, *epochs))
    job = start_torchrun(tiny_fit_args(data.interactions, killed, "--epochs", "200", "--patience", "1000"))
    try:
        victim = rank_pid(job, 1)
        deadline = time.time() + 120
        while not (killed / "metrics.jsonl").is_file() or len(read_jsonl(killed / "metrics.jsonl")) < 1:
            assert job.poll() is None, job.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)  # rank 1 dies during epoch 2 (index 1)
        assert job.wait(timeout=120) != 0  # torchrun stops the whole job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert reference.wait(timeout=240) == 0, reference.stderr.read()
    assert not (killed / "results.json").exists()
    done = len(read_jsonl(killed / "metrics.jsonl"))
    assert 1 <= done < 200
    from fixtures_runs import tiny_config

    cfg = tiny_config(data.interactions, killed, epochs=4, patience=100, dropout=0.0, attn_dropout=0.0)
    cfg.train.batch_size = 32
    if done >= 4:
        pytest.skip("the killed job finished 4 epochs before the kill landed")
    resumed = fit(cfg, resume=True)  # one process continues the 2-rank run
    want = read_jsonl(straight / "metrics.jsonl")
    got = read_jsonl(killed / "metrics.jsonl")
    assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in want], rel=1e-4)
    best = int(np.argmax([h["valid_ndcg@10"] for h in want]))
    assert resumed.valid["ndcg@10"] == pytest.approx(want[best]["valid_ndcg@10"], abs=0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine(tmp_path):
    """The multi-node path: two torchrun launchers (--nnodes 2) meet through c10d on 127.0.0.1."""
    data = synth_dataset()
    port = _free_port()
    args = tiny_fit_args(data.interactions, tmp_path / "run", "--epochs", "1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pixelrec",
                               "--node-rank", str(rank)] + [str(a) for a in args],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert RunDir(tmp_path / "run").published().best_epoch == 0


def test_ranks_started_with_different_settings_are_refused(tmp_path):
    data = synth_dataset()
    port = _free_port()
    procs = []
    for rank, dim in ((0, "16"), (1, "32")):
        env = {**cli_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PIXELREC_DIST_TIMEOUT": "60"}
        args = tiny_fit_args(data.interactions, tmp_path / "run", "--epochs", "1")
        args[args.index("--dim") + 1] = dim
        procs.append(subprocess.Popen([sys.executable] + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2]
    assert_one_line_error(err0, "different fit settings", "rank 1")
    assert err1.strip() == ""  # the other ranks stop quietly
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("victim", [1, 0])
def test_a_lost_rank_is_named_by_the_survivor(tmp_path, victim):
    """A rank killed mid-training: the survivor's next collective fails; it says which rank stopped and
    how to continue, exit 2 (the ranks are started with torchrun's environment, so each one's own exit
    status and stderr are seen, not the launcher's summary)."""
    data = synth_dataset()
    port, out = _free_port(), tmp_path / "run"
    args = tiny_fit_args(data.interactions, out, "--epochs", "200", "--patience", "1000")
    procs = [subprocess.Popen([sys.executable] + [str(a) for a in args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={
                                  **cli_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "PIXELREC_DIST_TIMEOUT": "60"})
             for rank in (0, 1)]
    try:
        deadline = time.time() + 90
        while not (out / "metrics.jsonl").is_file():  # a finished epoch: both ranks are training
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
            assert time.time() < deadline
            time.sleep(0.02)
        procs[victim].kill()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert survivor.returncode == 2, err
    prefix = "" if victim == 1 else "rank 1: "  # a rank other than 0 says which it is
    line = assert_one_line_error(err, f"error: {prefix}rank {victim} stopped; rerun with --resume")
    assert "bug" not in line
    assert RunDir(out).read_metrics()  # the finished epochs stay, for --resume


# ------------------------------------------------------------------------------------- encode
def _encode_args(covers, out, *extra) -> list:
    return ["-m", "pixelrec", "--quiet", "encode", "--images", covers, "--out", out, "--encoder", "pixelrec-tiny-vit",
            "--split-block", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", *extra]




def test_two_rank_encode_equals_one_rank_and_resumes_after_a_killed_rank(tmp_path):
    covers = cold_dataset().covers
    one = tmp_path / "one.h5"
    encode_images(EncodeConfig(images=str(covers), out=str(one), encoder=EncoderConfig(model="pixelrec-tiny-vit"),
                               split_block=2, batch_size=8, num_workers=0, device="cpu"))
    two = tmp_path / "two.h5"
    r = torchrun(_encode_args(covers, two))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("items encoded") == 1
    same_cache(one, two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # shards merged and removed

    killed = tmp_path / "killed.h5"
    job = start_torchrun(_encode_args(covers, killed))
    try:
        victim = rank_pid(job, 1)
        shard = Path(f"{killed}.shard-1-of-2.partial")
        deadline = time.time() + 60
        while not shard.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(victim, signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    if job.returncode == 0:
        pytest.skip("the encode finished before rank 1 could be killed")
    assert not killed.exists()  # nothing under the final name
    r = torchrun(_encode_args(covers, killed))  # the same command resumes every shard, then merges
    assert r.returncode == 0, r.stderr
    same_cache(one, killed)


def test_shards_of_another_world_size_are_refused(tmp_path):
    out = tmp_path / "c.h5"
    Path(f"{out}.shard-0-of-3.partial").write_bytes(b"")
    with pytest.raises(PixelrecError, match=r"c\.h5\.shard-0-of-3\.partial: a shard of an encode with 3 ranks"):
        check_no_foreign_shards(out, 2)
    check_no_foreign_shards(out, 3)


# ----------------------------------------------------------------------------- evaluate, retrieve
def test_two_rank_evaluate_and_retrieve_equal_one_rank(tmp_path):
    run, _ = trained_run()
    want = evaluate_run(str(run), batch_size=64)  # 200 users: 4 batches, 2 per rank
    r = torchrun(["-m", "pixelrec", "--quiet", "evaluate", run, "--json", "--batch-size", "64"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(want))

    one = tmp_path / "one.jsonl"
    retrieve_batch(str(run), "all", k=7, out=str(one), batch_size=64)
    two = tmp_path / "two.jsonl"
    r = torchrun(["-m", "pixelrec", "--quiet", "retrieve", run, "--users", "all", "--k", "7", "--batch-size", "64",
                  "--out", two])
    assert r.returncode == 0, r.stderr
    assert two.read_bytes() == one.read_bytes()
    assert r.stderr.count("retrieved for") == 1

    user = str(RunDir(run).read_data().user_ids[5])
    r = torchrun(["-m", "pixelrec", "retrieve", run, "--user", user, "--json"])  # answered once, by rank 0
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["user_id"] == user


# ------------------------------------------------------------------------------------ bad input
def test_a_missing_backend_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_gloo_available", lambda: False)
    with pytest.raises(PixelrecError, match="backend gloo is not available"):
        distributed.init("cpu")


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(PixelrecError, match="RANK=5 and WORLD_SIZE=2"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(PixelrecError, match="RANK='x'"):
        distributed.env_world()


def test_a_world_of_one_is_a_plain_process():
    world = distributed.World()
    assert world.span(10) == (0, 10) and world.share([1, 2, 3]) == [1, 2, 3]
    assert world.gather("x") == ["x"] and world.broadcast(7) == 7 and world.on_main(lambda: 3) == 3
    spans = [distributed.World(rank=r, size=3).span(10) for r in range(3)]
    assert spans == [(0, 3), (3, 6), (6, 10)]


# ------------------------------------------------------------------------------ FAISS on GPUs
def test_several_gpus_get_a_sharded_or_replicated_index(monkeypatch):
    """Without GPUs here, FAISS's multi-GPU cloning is replaced by a recorder: the wiring is checked
    (which FAISS call, which option), not FAISS itself."""
    import faiss

    from pixelrec.cli import GPU_LAYOUTS as CLI_LAYOUTS
    from pixelrec.index import faiss_factory

    calls = []
    monkeypatch.setattr(faiss_factory, "resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(faiss_factory, "faiss_has_gpu", lambda: True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {"shard": False}), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, co: calls.append(co.shard) or index,
                        raising=False)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(4))
    for layout, shard in (("shard", True), ("replicate", False)):
        placed, device, _ = faiss_factory.place_index(index, "cuda", "Flat", layout)
        assert placed is index and device == f"cuda:all (2 GPUs, {layout})" and calls[-1] is shard
    with pytest.raises(PixelrecError, match="unknown GPU layout 'mirror'"):
        faiss_factory.place_index(index, "cuda", "Flat", "mirror")
    assert CLI_LAYOUTS == faiss_factory.GPU_LAYOUTS
