"""Token-cache reads on the `partial` tower's hot path: in memory against on demand (docs/performance.md).

Two measurements, one thread:

1. **Reads**: a token dataset laid out as `pixelrec encode` lays it out (float16 rows [T, W], chunks
   of whole rows, ~64 KiB), N rows; each read takes the distinct rows of one training step (drawn
   from a long-tailed popularity, as a batch's items are). Compared: rows from RAM (`in_memory`),
   the memory-mapped read (`_MappedRows`, the on-demand path), and the earlier h5py selection
   (`_gather`: one HDF5 point selection of the sorted rows).
2. **Fit**: training steps of `fit --items partial` on a cache made by `pixelrec encode` (e.g. the
   one `benchmarks/pixel200k.py --workdir DIR` leaves in DIR/scale-S/), with `--cache-in-memory yes`
   against `no` (memory map, and the earlier h5py selection): steps/s and the time in token reads.

    python benchmarks/cache_reads.py [--rows 20000 --token-shape 50x768 --step-rows 2000]
                                     [--fit-workdir /tmp/pixel200k/scale-0.01]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def token_file(path: Path, rows: int, shape: tuple[int, int], seed: int = 0) -> None:
    """A chunked float16 dataset `tokens` [rows, T, W] as the cache writer makes it (written in blocks)."""
    from pixelrec.encode.cache import TOKEN_CHUNK_BYTES

    rng = np.random.default_rng(seed)
    t, w = shape
    chunk = int(min(16, max(1, TOKEN_CHUNK_BYTES // (t * w * 2))))
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("tokens", (0, t, w), maxshape=(None, t, w), dtype=np.float16, chunks=(chunk, t, w))
        for start in range(0, rows, 256):
            block = rng.standard_normal((min(256, rows - start), t, w)).astype(np.float16)
            ds.resize(start + len(block), axis=0)
            ds[start:] = block


def step_rows(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` row draws of one step from a 1/rank popularity over n rows (repeats kept, as a batch has)."""
    weights = 1.0 / np.arange(1, n + 1)
    return rng.permutation(n)[rng.choice(n, size=count, p=weights / weights.sum())]


def reads(rows: int, shape: tuple[int, int], count: int, repeats: int) -> list[dict]:
    from pixelrec.encode.cache import _gather, _MappedRows

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.h5"
        token_file(path, rows, shape)
        rng = np.random.default_rng(1)
        draws = [step_rows(rng, rows, count) for _ in range(repeats)]
        with h5py.File(path, "r") as f:
            ds = f["tokens"]
            mapped = _MappedRows.of(path, ds)
            memory = ds[:]
            ways = {"in memory (numpy rows)": lambda r: memory[r],
                    "on demand: memory map (now)": mapped.gather,
                    "on demand: h5py selection (before)": lambda r: _gather(ds, r)}
            for r in draws[:3]:
                assert all(np.array_equal(way(r), memory[r]) for way in ways.values())
            out = []
            for name, way in ways.items():
                way(draws[0])
                start = time.perf_counter()
                for r in draws:
                    way(r)
                ms = 1000 * (time.perf_counter() - start) / len(draws)
                distinct = int(np.mean([len(np.unique(r)) for r in draws]))
                out.append({"read": name, "ms_per_step": round(ms, 2), "distinct_rows": distinct})
    return out


def partial_steps(workdir: Path, in_memory: str, memory_map: bool = True, steps: int = 30) -> dict:
    """Training steps/s of `--items partial` (defaults) on DIR/interactions.csv + DIR/cache.h5: the first
    `steps` batches of epoch 0 (forward, backward, AdamW), the first 3 not timed."""
    import torch

    from pixelrec.data.sequences import load_sequences
    from pixelrec.encode import cache as cache_module
    from pixelrec.recommend.batches import iterate_batches, training_windows
    from pixelrec.recommend.build import build_optimizer, build_recommender
    from pixelrec.recommend.config import FitConfig

    original = cache_module._MappedRows.of
    if not memory_map:
        cache_module._MappedRows.of = classmethod(lambda cls, path, ds: None)
    try:
        cfg = FitConfig(interactions=str(workdir / "interactions.csv"), out="-")
        cfg.items.kind, cfg.items.cache, cfg.items.cache_in_memory = "partial", str(workdir / "cache.h5"), in_memory
        cfg.resolve_defaults()
        data = load_sequences(cfg.interactions)
        torch.manual_seed(0)
        model = build_recommender(cfg, data)
        optimizer = build_optimizer(model, cfg)
        windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride)
        gen = torch.Generator().manual_seed(0)
        model.train()
        start, reading = 0.0, 0.0
        read_tokens = model.tower.read_tokens

        def timed_read(idx):
            nonlocal reading
            t = time.perf_counter()
            out = read_tokens(idx)
            reading += time.perf_counter() - t
            return out

        model.tower.read_tokens = timed_read
        for i, (seq, trained) in enumerate(iterate_batches(windows, cfg.train.batch_size, gen)):
            if i == 3:
                start, reading = time.perf_counter(), 0.0
            if i == steps + 3:
                break
            loss = model.training_loss(seq, None, None, trained, uniform=model.draw_uniform_negatives(gen))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
    finally:
        cache_module._MappedRows.of = original
    return {"steps_per_s": round(steps / seconds, 3), "read_ms_per_step": round(1000 * reading / steps, 1),
            "step_ms": round(1000 * seconds / steps, 1), "tokens_in_memory": model.tower.tokens is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--token-shape", default="50x768", help="T x W of a cached item (ViT-B-32 at 224 px: 50x768)")
    ap.add_argument("--step-rows", type=int, default=2_000, help="item draws per step (repeats collapse)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fit-workdir", default=None, help="a directory with interactions.csv and cache.h5 (tokens)")
    ap.add_argument("--fit-steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    from pixelrec.runtime import set_quiet

    torch.set_num_threads(1)
    set_quiet(True)
    shape = tuple(int(x) for x in args.token_shape.split("x"))
    print(f"reads: {args.rows:,} rows of {shape[0]}x{shape[1]} float16 ({shape[0] * shape[1] * 2 / 1024:.1f} KiB), "
          f"{args.step_rows} draws per step")
    print("| read | ms per step | distinct rows per step |\n|---|---:|---:|")
    for row in reads(args.rows, shape, args.step_rows, args.repeats):
        print(f"| {row['read']} | {row['ms_per_step']} | {row['distinct_rows']} |")
    if args.fit_workdir:
        print(f"\nfit --items partial, {args.fit_steps} training steps (defaults)\n"
              "| cache | steps/s | ms per step | of which token reads |\n|---|---:|---:|---:|")
        for in_memory, mapped in (("yes", True), ("no", True), ("no", False)):
            r = partial_steps(Path(args.fit_workdir), in_memory, mapped, args.fit_steps)
            name = ("in memory" if in_memory == "yes"
                    else "on demand, " + ("memory map" if mapped else "h5py selection (before)"))
            print(f"| {name} | {r['steps_per_s']} | {r['step_ms']} | {r['read_ms_per_step']} ms |", flush=True)


if __name__ == "__main__":
    main()
