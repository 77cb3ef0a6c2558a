"""Pixel200K-shaped cost benchmark: every stage of the pipeline on data of PixelRec's real shape.

Synthesises a dataset of the published Pixel200K shape (200,000 users, 96,282 items, 3,965,656
interactions, user sequence lengths following the published histogram, long-tailed item popularity
with the most popular item at about 560 interactions, one small cover per item), scaled by
`--scale` (1.0 = full; 0.1 = ten times fewer users, items and interactions, same shape), then
measures each stage through the public API, each in its own process (imports done before the
clock starts):

    load        interactions CSV -> sequences and split (`load_sequences`)
    encode      every cover through the tiny ViT (`pixelrec-tiny-vit`, 32 px, 4 blocks) into a cache with
                the tokens of the top 2 blocks (`encode_images`)
    fit-id      one epoch of `fit --items id` (default `--softmax auto`: the cost rule picks full or
                sampled softmax and the negatives), validation, test evaluation and index publication included
    fit-id-full the same with `--softmax full`: what the full softmax over the whole catalogue costs
    fit-frozen  the same with `--items frozen` on the cache
    fit-partial the same with `--items partial` (top 2 blocks trained on the cached tokens)
    evaluate    full-ranking evaluation of every user of the id run (`evaluate_run`)
    retrieve    `retrieve --users all` of the id run to a JSONL file (`retrieve_batch`)

For each stage it prints the wall time, the peak RSS of its process (Linux VmHWM, imports
included; in brackets its RSS once the libraries are imported), the cost ratio to the same stage
at a 10x smaller scale (`--compare-scale`, run first), and the top 5 functions by own time under
cProfile (times include cProfile's overhead, alike at both scales). Interactions are random draws from the popularity (no sequential signal): the
benchmark is about cost, not quality.

    python benchmarks/pixel200k.py --scale 0.1                  # and 0.01 for the ratio
    python benchmarks/pixel200k.py --scale 0.01 --compare-scale 0 --stages fit-id --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

USERS, ITEMS, INTERACTIONS = 200_000, 96_282, 3_965_656
# Published histogram of user sequence lengths: (low, high] -> users.
LENGTH_BINS = [(5, 10, 47_084), (10, 20, 97_047), (20, 30, 28_027), (30, 40, 12_145), (40, 60, 9_369),
               (60, 80, 3_292), (80, 100, 1_389), (100, 200, 1_472), (200, 300, 154), (300, 500, 21)]
TOP_ITEM_COUNT = 560  # interactions of the most popular item
STAGES = ("load", "encode", "fit-id", "fit-id-full", "fit-frozen", "fit-partial", "evaluate", "retrieve")
NEEDS = {"fit-frozen": ("encode",), "fit-partial": ("encode",), "evaluate": ("fit-id",), "retrieve": ("fit-id",)}
ENCODER = "pixelrec-tiny-vit"
SPLIT_BLOCK = 2
COVER_SIDE = 32


# --------------------------------------------------------------------------------- the data
def scaled_bins(scale: float) -> list[tuple[int, int, int]]:
    """The length histogram at `scale`: counts rounded by largest remainder to sum to the scaled users."""
    users = max(len(LENGTH_BINS), round(USERS * scale))
    raw = np.array([count * users / USERS for _, _, count in LENGTH_BINS])
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: users - counts.sum()]] += 1
    return [(low, high, int(c)) for (low, high, _), c in zip(LENGTH_BINS, counts)]


def sequence_lengths(scale: float, rng: np.random.Generator) -> np.ndarray:
    """One length per user: the histogram's bins, within a bin p(l) ~ l^-a with `a` solved so the
    lengths sum to the scaled interaction count, then corrected to it exactly."""
    bins = scaled_bins(scale)
    total = round(INTERACTIONS * sum(c for _, _, c in bins) / USERS)

    def expected(a: float) -> float:
        return sum(c * _bin_mean(low, high, a) for low, high, c in bins)

    low_a, high_a = -5.0, 10.0
    for _ in range(60):
        middle = (low_a + high_a) / 2
        low_a, high_a = (middle, high_a) if expected(middle) > total else (low_a, middle)
    lengths = np.concatenate([_draw(low, high, c, low_a, rng) for low, high, c in bins])
    return _correct_total(lengths, bins, total, rng)


def _bin_mean(low: int, high: int, a: float) -> float:
    values = np.arange(low + 1, high + 1, dtype=float)
    weights = values ** -a
    return float((values * weights).sum() / weights.sum())


def _draw(low: int, high: int, count: int, a: float, rng: np.random.Generator) -> np.ndarray:
    values = np.arange(low + 1, high + 1)
    weights = values.astype(float) ** -a
    return rng.choice(values, size=count, p=weights / weights.sum())


def _correct_total(lengths: np.ndarray, bins: list, total: int, rng: np.random.Generator) -> np.ndarray:
    """Add or remove one interaction at a time from random users whose length stays in its bin."""
    bounds = np.concatenate([np.full(c, low) for low, _, c in bins]), np.concatenate([np.full(c, high) for _, high, c in bins])
    while (gap := total - int(lengths.sum())) != 0:
        step = 1 if gap > 0 else -1
        room = np.flatnonzero(lengths + step <= bounds[1]) if step > 0 else np.flatnonzero(lengths + step > bounds[0])
        chosen = rng.choice(room, size=min(abs(gap), len(room)), replace=False)
        lengths[chosen] += step
    return lengths


def item_counts(n_items: int, total: int) -> np.ndarray:
    """Interactions per item (most popular first): c(q) = A / (q + q0) over item quantiles q, the most
    popular at about TOP_ITEM_COUNT and the mean total / n_items, rescaled to sum to `total` exactly."""
    mean = total / n_items
    low, high = 1e-6, 10.0  # q0: the mean of A/(q+q0) with A = TOP * q0 is TOP * q0 * ln(1 + 1/q0)
    for _ in range(100):
        q0 = (low + high) / 2
        low, high = (q0, high) if TOP_ITEM_COUNT * q0 * math.log1p(1 / q0) < mean else (low, q0)
    q = (np.arange(n_items) + 0.5) / n_items
    shape = TOP_ITEM_COUNT * q0 / (q + q0)
    counts = np.maximum(1, np.floor(shape * total / shape.sum())).astype(np.int64)
    remainder = total - int(counts.sum())
    counts[np.arange(abs(remainder)) % n_items] += int(np.sign(remainder))
    return counts


def synthesise(root: Path, scale: float, seed: int = 0) -> dict:
    """interactions.csv (item_id,user_id,timestamp) and covers/<item>.png under `root`; returns the shape."""
    rng = np.random.default_rng(seed)
    lengths = sequence_lengths(scale, rng)
    n_items = max(10, round(ITEMS * scale))
    counts = item_counts(n_items, int(lengths.sum()))
    names = rng.permutation(n_items)  # popularity is not in id order
    tokens = rng.permutation(np.repeat(names, counts))  # every interaction, dealt to users in turn
    users = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(rng.integers(1_500_000_000, 1_600_000_000, len(lengths)), lengths)
    steps = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "interactions.csv", "w") as f:
        f.write("item_id,user_id,timestamp\n")
        f.writelines(f"i{i},u{u},{t}\n" for i, u, t in zip(tokens.tolist(), users.tolist(), (starts + 60 * steps).tolist()))
    write_covers(root / "covers", n_items, rng)
    return {"users": int(len(lengths)), "items": n_items, "interactions": int(lengths.sum()),
            "top_item_interactions": int(counts.max()), "min_item_interactions": int(counts.min()),
            "length_histogram": {f"({lo},{hi}]": int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi, _ in LENGTH_BINS}}


def write_covers(directory: Path, n_items: int, rng: np.random.Generator) -> None:
    """A COVER_SIDE-pixel PNG per item: a 4x4 grid of random colours, enlarged (cheap to render and decode)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    grids = rng.integers(0, 256, (n_items, 4, 4, 3), dtype=np.uint8)
    cell = COVER_SIDE // 4
    for item, grid in enumerate(grids):
        Image.fromarray(grid.repeat(cell, 0).repeat(cell, 1)).save(directory / f"i{item}.png")


# --------------------------------------------------------------------------------- the stages
def run_stage(stage: str, work: Path, device: str) -> dict:
    """Run one stage in this process (the child); returns what it produced worth reporting."""
    from pixelrec.runtime import set_quiet

    set_quiet(True)
    csv, cache = str(work / "interactions.csv"), str(work / "cache.h5")
    if stage == "load":
        from pixelrec.data.sequences import load_sequences

        data = load_sequences(csv)
        return {"users": data.num_users, "items": data.num_items, "interactions": data.num_interactions}
    if stage == "encode":
        from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images

        Path(cache).unlink(missing_ok=True)  # a fresh encode, not the reuse of an earlier one
        summary = encode_images(EncodeConfig(images=str(work / "covers"), out=cache, interactions=csv,
                                             encoder=EncoderConfig(model=ENCODER), split_block=SPLIT_BLOCK,
                                             device=device, overwrite=True))
        return {"images": summary.n_encoded, "images_per_s": round(summary.images_per_s, 1)}
    if stage == "fit-id-full":
        return _fit("id", csv, cache, work, device, softmax="full", out="run-id-full")
    if stage.startswith("fit-"):
        return _fit(stage.removeprefix("fit-"), csv, cache, work, device)
    if stage == "evaluate":
        from pixelrec.runs.evaluate import evaluate_run

        report = evaluate_run(str(work / "run-id"), device=device)
        return {"users": report["users"], "ndcg@10": report["overall"]["ndcg@10"]}
    if stage == "retrieve":
        from pixelrec.runs.retrieve import retrieve_batch

        result = retrieve_batch(str(work / "run-id"), "all", k=10, out=str(work / "top10.jsonl"), device=device)
        return {"users": result.served}
    raise SystemExit(f"unknown stage {stage}")


def _fit(kind: str, csv: str, cache: str, work: Path, device: str, amp: bool = True, softmax: str = "auto",
         out: str | None = None) -> dict:
    """One epoch of `kind`; the epoch's training time is split from validation, test and publishing."""
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    out = out or f"run-{kind}"
    cfg = FitConfig(interactions=csv, out=str(work / out))
    cfg.items.kind, cfg.loss.softmax = kind, softmax
    if kind in ("frozen", "partial"):
        cfg.items.cache = cache
    cfg.train.epochs, cfg.train.patience, cfg.train.device = 1, 1, device
    cfg.train.precision = "auto" if amp else "fp32"
    result = fit(cfg, overwrite=True)
    epoch = json.loads((work / out / "metrics.jsonl").read_text().splitlines()[0])
    loss = json.loads((work / out / "config.json").read_text())["config"]["loss"]
    return {"softmax": loss["softmax"], "negatives": loss["negatives"],
            "train_seconds": round(epoch["train_seconds"], 2), "epoch_seconds": round(epoch["seconds"], 2),
            "fit_seconds": round(result.seconds, 2), "test_ndcg@10": result.test["overall"]["ndcg@10"]}


def preload() -> None:
    """Import everything a stage may import lazily, so the stage's time and profile are its work alone."""
    import h5py  # noqa: F401
    import open_clip  # noqa: F401
    import torch.distributed  # noqa: F401

    import pixelrec.data.sequences  # noqa: F401
    import pixelrec.encode  # noqa: F401
    import pixelrec.runs.evaluate  # noqa: F401
    import pixelrec.runs.fit  # noqa: F401
    import pixelrec.runs.retrieve  # noqa: F401


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak RSS, VmRSS: current) in MB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def child(stage: str, work: Path, device: str, top: int = 5) -> dict:
    """Run `stage` under cProfile: wall time, own peak RSS, top functions by own time, stage output."""
    import cProfile
    import pstats

    preload()
    base_rss = _status_mb("VmRSS:")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    output = run_stage(stage, work, device)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # (cc, nc, tottime, ...)
    return {"stage": stage, "seconds": round(wall, 3), "peak_rss_mb": round(_status_mb("VmHWM:"), 1),
            "rss_after_imports_mb": round(base_rss, 1), "output": output,
            "top": [{"function": _function_name(key), "own_s": round(value[2], 3),
                     "share": round(value[2] / wall, 3)} for key, value in rows]}


def _function_name(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":
        return name  # a builtin or C function, e.g. <method 'matmul' of 'torch._C.TensorBase' objects>
    parts = Path(filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else \
        "/".join(parts[parts.index("pixelrec"):]) if "pixelrec" in parts else Path(filename).name
    return f"{short}:{line}({name})"


def measure(scale: float, stages: list[str], root: Path, device: str, seed: int, reuse: bool = False,
            threads: int = 1) -> dict:
    """Synthesise (once per scale) and run every stage in its own process; returns the results by stage.

    Each stage's result is also saved in the scale's directory; with `reuse`, a saved one is taken
    instead of running the stage again (so a long measurement can be done a few stages at a time)."""
    work = root / f"scale-{scale:g}"
    shape_file = work / "shape.json"
    if not shape_file.is_file():
        started = time.perf_counter()
        shape = synthesise(work, scale, seed)
        shape["synthesis_seconds"] = round(time.perf_counter() - started, 1)
        shape_file.write_text(json.dumps(shape, indent=1))
    results = {"scale": scale, "shape": json.loads(shape_file.read_text()), "stages": {}}
    for stage in stages:
        saved = work / f"result-{stage}-{device.replace(':', '')}.json"
        if reuse and saved.is_file():
            results["stages"][stage] = json.loads(saved.read_text())
            print(f"  scale {scale:g}: {stage}: saved result, {results['stages'][stage]['seconds']:.1f}s", flush=True)
            continue
        print(f"  scale {scale:g}: {stage} ...", end="", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
        proc = subprocess.run([sys.executable, __file__, "--child", stage, "--workdir", str(work), "--device", device],
                              stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"stage {stage} at scale {scale:g} failed (exit {proc.returncode})")
        results["stages"][stage] = json.loads(proc.stdout.splitlines()[-1])
        saved.write_text(json.dumps(results["stages"][stage]))
        print(f" {results['stages'][stage]['seconds']:.1f}s", flush=True)
    return results


def with_prerequisites(stages: list[str]) -> list[str]:
    wanted = set(stages)
    for stage in stages:
        wanted.update(NEEDS.get(stage, ()))
    return [s for s in STAGES if s in wanted]


# --------------------------------------------------------------------------------- reporting
def table(main: dict, smaller: dict | None) -> str:
    """Markdown: one row per stage with wall time, peak RSS, the ratio to the smaller scale, top functions."""
    ratio_head = f"x vs {smaller['scale']:g}" if smaller else "x vs 1/10"
    lines = [f"| stage | wall s | peak RSS MB (after imports) | {ratio_head} | top 5 functions by own time "
             "(share of wall) |", "|---|---:|---:|---:|---|"]
    for stage, row in main["stages"].items():
        small = smaller["stages"].get(stage) if smaller else None
        ratio = f"{row['seconds'] / small['seconds']:.1f}" if small else "-"
        top = "; ".join(f"`{t['function']}` {t['share']:.0%}" for t in row["top"])
        lines.append(f"| {stage} | {row['seconds']:.1f} | {row['peak_rss_mb']:,.0f} ({row['rss_after_imports_mb']:,.0f})"
                     f" | {ratio} | {top} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1, help="1.0 = Pixel200K's full size")
    parser.add_argument("--compare-scale", type=float, default=None, help="default scale / 10; 0 = none")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated; prerequisites are added")
    parser.add_argument("--workdir", default=None, help="data, caches and runs (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / FAISS threads per stage (1: steady on a shared machine; 0: the libraries' own choice)")
    parser.add_argument("--reuse", action="store_true",
                        help="take stages already measured in --workdir from their saved results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir), args.device)))
        return
    if not 0 < args.scale <= 1:
        raise SystemExit("--scale must be in (0, 1]")
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    stages = with_prerequisites([s for s in args.stages.split(",") if s])
    compare = args.scale / 10 if args.compare_scale is None else args.compare_scale
    root = Path(args.workdir or __import__("tempfile").mkdtemp(prefix="pixelrec-pixel200k-"))
    print(f"pixel200k: scale {args.scale:g} (compare {compare:g}), {os.cpu_count()} CPU cores, "
          f"{args.threads or 'default'} thread(s) per stage, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}, work in {root}")
    smaller = measure(compare, stages, root, args.device, args.seed, args.reuse, args.threads) if compare else None
    main_results = measure(args.scale, stages, root, args.device, args.seed, args.reuse, args.threads)
    shape = main_results["shape"]
    print(f"\nshape at scale {args.scale:g}: {shape['users']:,} users, {shape['items']:,} items, "
          f"{shape['interactions']:,} interactions, most popular item {shape['top_item_interactions']}, "
          f"lengths {shape['length_histogram']}")
    print(table(main_results, smaller))
    for stage in ("fit-id", "fit-id-full", "fit-frozen", "fit-partial"):
        out = main_results["stages"].get(stage, {}).get("output")
        if out:
            print(f"{stage}: {out['softmax']} softmax ({out['negatives']} negatives), "
                  f"training {out['train_seconds']}s of a {out['epoch_seconds']}s epoch (the rest: "
                  f"validation); whole fit with test evaluation and publication {out['fit_seconds']}s")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"main": main_results, "smaller": smaller}, indent=1))


if __name__ == "__main__":
    main()
