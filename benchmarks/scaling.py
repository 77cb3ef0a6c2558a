"""Scaling on torch.distributed: 1 rank vs 2 ranks (one thread each) for encode and fit.

    python benchmarks/scaling.py [--workdir DIR] [--users 1500] [--items 600] [--image-size 64]

Synthesises a catalogue, then runs under `torchrun --standalone --nproc-per-node N -m pixelrec`:
- encode: ViT-B-32 (random init) at --image-size, tokens for the top 2 blocks; images/s of the
  sharded encoding, and of the whole command (shards merged into one cache included);
- fit: one epoch of `id` and of `partial` (ViT-B-32's top 2 blocks trained on the cached tokens),
  seconds of the training epoch alone (metrics.jsonl's train_seconds);
and prints the speed-ups with the bytes DistributedDataParallel all-reduces per step (the trainable
parameters' gradients, float32). With 2 CPU cores the speed-up cannot exceed 2x; the script also
measures what the machine itself gives two processes (the same single-thread matrix products run
alone and two at once), since virtual cores often share one physical core's arithmetic units.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def torchrun(nproc: int, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PIXELREC_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "pixelrec"] + args
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


MATMUL = ("import time, torch; torch.set_num_threads(1); a = torch.randn(1024, 1024); [a @ a for _ in range(3)]; "
          "t = time.perf_counter(); [a @ a for _ in range(40)]; print(2 * 1024 ** 3 * 40 / (time.perf_counter() - t))")


def machine_ceiling() -> float:
    """Aggregate matrix-product throughput of two single-thread processes, relative to one alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = float(subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, env=env).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", MATMUL], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    together = sum(float(proc.communicate()[0]) for proc in pair)
    return together / alone


def allreduce_bytes(run_dir: Path) -> int:
    """Bytes of the gradients DDP all-reduces per step: every trainable parameter, float32."""
    from pixelrec.recommend.build import build_recommender
    from pixelrec.runs.rundir import RunDir

    run = RunDir(run_dir)
    cfg = run.fit_config()
    cfg.items.cache_in_memory = "no"
    model = build_recommender(cfg, run.read_data())
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pixelrec-scaling-"))
    data = work / "data"
    if not (data / "interactions.csv").is_file():
        subprocess.run([sys.executable, "-m", "pixelrec", "--quiet", "synth", str(data), "--users", str(args.users),
                        "--items", str(args.items), "--cold-items", "10", "--image-size", str(args.image_size)],
                       check=True)
    interactions = str(data / "interactions.csv")
    encode = ["--quiet", "encode", "--images", str(data / "covers"), "--interactions", interactions,
              "--encoder", "ViT-B-32", "--image-size", str(args.image_size), "--split-block", "2",
              "--batch-size", "32", "--workers", "0", "--device", "cpu"]
    rows, cache = [], work / "cache_1.h5"
    for nproc in (1, 2):
        out = work / f"cache_{nproc}.h5"
        wall, stdout = torchrun(nproc, encode + ["--out", str(out), "--overwrite"])
        rate = float(re.search(r"([\d.]+) images/s", stdout).group(1))
        rows.append(("encode", nproc, rate, args.items / wall))
    fit = ["--quiet", "fit", "--interactions", interactions, "--epochs", "1", "--device", "cpu", "--json"]
    towers = {"id": [], "partial": ["--items", "partial", "--cache", str(cache)]}
    step_bytes = {}
    for name, extra in towers.items():
        for nproc in (1, 2):
            out = work / f"run_{name}_{nproc}"
            torchrun(nproc, fit + extra + ["--out", str(out), "--overwrite", "--batch-size", "128"])
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rows.append((f"fit {name}", nproc, history[0]["train_seconds"], None))
        step_bytes[name] = allreduce_bytes(work / f"run_{name}_2")

    print(f"\n{'stage':<12}{'ranks':>6}{'measure':>24}{'speed-up':>10}")
    base: dict[str, float] = {}
    for stage, nproc, value, whole in rows:
        if stage == "encode":
            measure, speed = f"{value:.1f} img/s ({whole:.1f} whole)", value
        else:
            measure, speed = f"{value:.2f} s/epoch", 1.0 / value
        base.setdefault(stage, speed)
        print(f"{stage:<12}{nproc:>6}{measure:>24}{speed / base[stage]:>9.2f}x")
    for name, size in step_bytes.items():
        print(f"fit {name}: {size / 1e6:.2f} MB of gradients all-reduced per step")
    print(f"this machine: two single-thread processes multiply matrices {machine_ceiling():.2f}x as fast as one "
          f"(the ceiling of a 2-rank speed-up in arithmetic-bound work)")
    print(f"(workdir {work})")


if __name__ == "__main__":
    main()
