"""Cost and quality of the item towers: s/epoch, peak memory, cache bytes and test NDCG@10.

Every tower of `--towers` (of TOWERS: id, frozen, the side variants, partial, e2e) trains the same
SASRec on the same data with the same encoder: `frozen` an adapter on the cached pooled embedding;
`side` a side network over every layer's cached class token (`encode --hidden cls`; `side-even` the
even taps and the last, `side-mean` / `side-even-mean` over a `--hidden cls+mean` cache, `side-hybrid`
ID + side); `partial` the top K blocks over the cache's split-block tokens; `e2e` the whole encoder on
the covers every step with its top K blocks trained (the reference PixelNet setting). Each fit runs
in its own process so its peak RSS (Linux VmHWM) and peak CUDA memory on a GPU are its own; "cache MB
read" is the stored size of the dataset the tower trains from (embeddings, hidden or tokens).
Prints, mean ± sd over `--seeds`: s/epoch, memory, overall NDCG@10, warm NDCG@10 and cold Recall@10,
the ratios to frozen and e2e, and for the side towers the two bars of the side-network issue: epoch
time at most 2x frozen's, at least half the NDCG@10 gap from frozen to partial recovered. `--plot`
draws NDCG@10 against s/epoch. Data: a small synthetic set (default), `--demo` (the demo's catalogue
and fit settings) or `--pixel200k SCALE` (benchmarks/pixel200k.py's Pixel200K-shaped data, pixelrec's
default fit settings; cost only). Results are kept per (tower, seed) under `--workdir`, reused by a
rerun with the same settings; `--report` prints what is there without fitting.

`--cls-only` instead times `partial`'s item-tower training step (forward, backward and an Adam step
of the top blocks and head on `--step-items` items) with the last block run for the class token only
(the default wherever the pooled output reads token 0) against the full last block (the old path,
forced by `image_towers.CLS_ONLY_LAST_BLOCK = False`), side by side in one process, interleaved.

    python benchmarks/fit_cost.py [--model ViT-B-32 --image-size 64 --split-block 2 --epochs 3]
    python benchmarks/fit_cost.py --demo --model pixelrec-tiny-vit --image-size 32 --seeds 0,1,2 \
        --towers id,frozen,side,side-even,side-mean,side-even-mean,side-hybrid,partial,e2e --workdir W --plot P.png
    python benchmarks/fit_cost.py --pixel200k 0.1 --model pixelrec-tiny-vit --image-size 32 --epochs 1 \
        --towers frozen,side,side-mean,partial --workdir W
    python benchmarks/fit_cost.py --cls-only --model ViT-B-32 --image-size 224 --items 40 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from pixelrec.runtime import set_quiet
from pixelrec.recommend.config import FitConfig
from pixelrec.runs.fit import fit
set_quiet(True)
a = json.loads(sys.argv[1])
cfg = FitConfig(interactions=a["interactions"], out=a["out"])
for key, value in a["set"].items():
    cfg.set(key, value)
cfg.items.cache = a["cache"] if cfg.items.uses_cache else None
if cfg.items.kind == "e2e":
    cfg.items.images, cfg.items.encoder, cfg.items.tune_blocks = a["images"], a["model"], a["k"]
    cfg.items.image_size = a["image_size"]  # the cache's input size, so e2e and partial compute the same function
cfg.train.seed, cfg.train.device = a["seed"], a["device"]
r = fit(cfg, overwrite=True)
peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
# VmHWM: this process's own peak RSS (ru_maxrss of a child would include the parent's RSS at fork)
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
t = r.test
print("RESULT " + json.dumps({"s_per_epoch": r.seconds_per_epoch, "ndcg@10": t["overall"]["ndcg@10"],
                              "warm_ndcg@10": t["warm"]["ndcg@10"], "cold_recall@10": t["cold"]["recall@10"],
                              "valid_ndcg@10": r.valid["ndcg@10"], "best_epoch": r.best_epoch,
                              "epochs": r.epochs_run, "peak_cuda": peak_cuda, "peak_rss_mb": hwm / 1024}))
"""

# Item towers compared (FitConfig overrides); `CACHE` picks the cache: "tokens" = the pooled
# embedding, the split-block tokens and every layer's class token (`encode --split-block K --hidden
# cls`), "mean" = every layer's class token and mean of patch tokens (`--hidden cls+mean`).
CACHE = "cache"
TOWERS: dict[str, dict] = {
    "id": {"items.kind": "id"},
    "frozen": {"items.kind": "frozen"},
    "side": {"items.kind": "side"},
    "side-even": {"items.kind": "side", "items.side_taps": "even"},
    "side-mean": {"items.kind": "side", CACHE: "mean"},
    "side-even-mean": {"items.kind": "side", "items.side_taps": "even", CACHE: "mean"},
    "side-hybrid": {"items.kind": "hybrid", "items.image_branch": "side"},
    "partial": {"items.kind": "partial"},
    "e2e": {"items.kind": "e2e"},
}
# the cache datasets each tower reads in training (its "cache bytes"; e2e reads the covers)
READS = {"id": (), "frozen": ("embeddings",), "partial": ("tokens",), "e2e": ()}
# `--demo`: the demo's catalogue and fit settings (pixelrec/demo.py, DemoConfig)
DEMO = dict(users=2000, items=400, cold_items=40, styles=8, image_size=32, seed=0)
DEMO_FIT = {"model.dim": 32, "model.max_len": 20, "train.epochs": 30, "train.patience": 5, "train.lr": 2e-3}


def tower_reads(name: str) -> tuple[str, ...]:
    kind = TOWERS[name]["items.kind"]
    if kind == "side" or TOWERS[name].get("items.image_branch") == "side":
        return ("hidden",)
    return READS[kind]


def run_child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args['name']} fit failed (exit {proc.returncode})")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def cached_child(args: dict, result: Path, refit: bool) -> dict:
    """run_child, or the result file of the same fit (same arguments) from an earlier run."""
    if result.is_file() and not refit:
        row = json.loads(result.read_text())
        if row.get("args") == args:
            return row
    row = {**run_child(args), "args": args}
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, result)
    return row


def dataset_bytes(cache: Path) -> dict[str, int]:
    """Stored bytes of each dataset of a cache (embeddings, tokens, hidden, ...)."""
    import h5py

    with h5py.File(cache, "r") as f:
        return {name: int(f[name].id.get_storage_size()) for name in f if isinstance(f[name], h5py.Dataset)}


def time_cls_only(interactions: str, cache: str, dim: int, steps: int, step_items: int) -> dict:
    """Median s/step of partial's item-tower training step, full last block vs class-token-only."""
    import statistics

    import torch

    from pixelrec.data.sequences import load_sequences
    from pixelrec.encode.cache import open_cache
    from pixelrec.recommend import image_towers

    data = load_sequences(interactions)
    towers = {}
    for name, enabled in (("old", False), ("cls-only", True)):
        image_towers.CLS_ONLY_LAST_BLOCK = enabled  # read when a tower is built
        torch.manual_seed(0)
        tower = image_towers.PartialTower(open_cache(cache), data, dim)
        if tower.cls_only != enabled:
            raise SystemExit(f"{cache}: the class-token-only path does not apply (pooling or family)")
        towers[name] = (tower, torch.optim.Adam(tower.parameters(), lr=1e-4))
    image_towers.CLS_ONLY_LAST_BLOCK = True
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(data.num_items, generator=gen)[:step_items] + 1 for _ in range(steps + 1)]
    with torch.no_grad():
        a, b = (towers[name][0](batches[0]) for name in ("cls-only", "old"))
    times: dict[str, list[float]] = {name: [] for name in towers}
    for i, idx in enumerate(batches):
        for name, (tower, opt) in towers.items():
            t = time.perf_counter()
            opt.zero_grad()
            tower(idx).square().mean().backward()
            opt.step()
            if i:  # the first step warms up
                times[name].append(time.perf_counter() - t)
    old, new = (statistics.median(times[name]) for name in ("old", "cls-only"))
    return {"old_s_per_step": old, "cls_only_s_per_step": new, "speedup": old / new,
            "max_rel_diff": float((a - b).abs().max() / b.abs().max())}


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """{tower: {key: (mean, sd over seeds)}} of every numeric result."""
    import numpy as np

    out = {}
    for name, runs in rows.items():
        out[name] = {"seeds": len(runs)}
        for key in (k for k, v in runs[0].items() if v is None or isinstance(v, (int, float))):
            vals = np.array([np.nan if r[key] is None else r[key] for r in runs], dtype=float)  # None: no cold user
            out[name][key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(runs) > 1 else 0.0)
    return out


def table(summary: dict[str, dict]) -> str:
    """Markdown: cost and quality per tower, mean ± sd over seeds."""
    def pm(s: dict, key: str, digits: int) -> str:
        mean, sd = s[key]
        return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if s["seeds"] > 1 else "")

    lines = ["| tower | seeds | s/epoch | peak RSS MB | peak CUDA MB | cache MB read | NDCG@10 | warm NDCG@10 "
             "| cold Recall@10 |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['seeds']} | {pm(s, 's_per_epoch', 2)} | {s['peak_rss_mb'][0]:.0f} | "
                     f"{s['peak_cuda'][0] / 2**20:.0f} | {s['cache_bytes'][0] / 1e6:.2f} | {pm(s, 'ndcg@10', 4)} | "
                     f"{pm(s, 'warm_ndcg@10', 4)} | {pm(s, 'cold_recall@10', 4)} |")
    return "\n".join(lines)


def target_lines(summary: dict[str, dict]) -> list[str]:
    """Each side tower's epoch time against frozen's (bar: <= 2x) and the share of the NDCG@10 gap
    from frozen to partial it recovers (bar: >= 0.5)."""
    if not {"frozen", "partial"} <= set(summary):
        return []
    frozen_t, frozen_q = summary["frozen"]["s_per_epoch"][0], summary["frozen"]["ndcg@10"][0]
    gap = summary["partial"]["ndcg@10"][0] - frozen_q
    lines = [f"bars: s/epoch <= 2 x frozen's ({2 * frozen_t:.2f}); NDCG@10 >= frozen + 0.5 x (partial - frozen) "
             f"({frozen_q + 0.5 * gap:.4f})"]
    for name, s in summary.items():
        if name.startswith("side"):
            t, q = s["s_per_epoch"][0] / frozen_t, (s["ndcg@10"][0] - frozen_q) / gap if gap else float("nan")
            ok = "meets both" if t <= 2 and q >= 0.5 else "misses"
            lines.append(f"  {name:<15} s/epoch / frozen {t:.2f}   gap frozen->partial recovered {q:.2f}   {ok}")
    return lines


def plot_frontier(summary: dict[str, dict], path: str, title: str) -> None:
    """NDCG@10 (mean ± sd over seeds) against s/epoch (log scale): the cost/quality frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    for name, s in summary.items():
        (x, xe), (y, ye) = s["s_per_epoch"], s["ndcg@10"]
        marker = "*" if name.startswith("side") else "o"
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, markersize=10 if marker == "*" else 6, capsize=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="s/epoch (log)", ylabel="test NDCG@10", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_data(args, work: Path) -> tuple[Path, Path, str]:
    """(interactions, covers, description) of the demo's catalogue, the Pixel200K shape or a synthetic set."""
    from pixelrec.data.synth import SynthConfig, synthesize

    data = work / "data"
    if args.pixel200k:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pixel200k import synthesise

        if not (data / "interactions.csv").is_file():
            shape = synthesise(data, args.pixel200k)
            (work / "shape.json").write_text(json.dumps(shape))
        shape = json.loads((work / "shape.json").read_text())
        return (data / "interactions.csv", data / "covers",
                f"the Pixel200K shape at scale {args.pixel200k:g} ({shape['users']:,} users x {shape['items']:,} "
                f"items, {shape['interactions']:,} interactions; no sequential signal: quality is noise)")
    synth = SynthConfig(**DEMO) if args.demo else SynthConfig(
        users=args.users, items=args.items, cold_items=max(1, args.items // 20), image_size=max(args.image_size, 32),
        styles=6)
    if not (data / "synth.json").is_file() or not json.loads((data / "synth.json").read_text()).get("complete"):
        synthesize(data, synth)
    what = "the demo's catalogue" if args.demo else "a synthetic set"
    return (data / "interactions.csv", data / "covers",
            f"{what} ({synth.users} users x {synth.items} items, {synth.cold_items} cold)")


def encode(args, covers: Path, interactions: Path, work: Path, hidden: str, split_block: int | None) -> tuple[Path, float]:
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images

    cache = work / f"cache-{args.model}-{args.image_size}-k{split_block or 0}-{hidden.replace('+', '-')}.h5"
    t = time.time()
    encode_images(EncodeConfig(images=str(covers), out=str(cache), interactions=str(interactions),
                               encoder=EncoderConfig(model=args.model, image_size=args.image_size),
                               split_block=split_block, device=args.device, num_workers=0, hidden=hidden))
    return cache, time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model (random init)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--split-block", type=int, default=2, help="K: blocks trained by partial and e2e")
    ap.add_argument("--towers", default="frozen,side,partial,e2e", help=f"comma-separated, of {', '.join(TOWERS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (mean ± sd over them)")
    ap.add_argument("--demo", action="store_true", help="the demo's catalogue and fit settings (pixelrec demo); "
                    "give --model pixelrec-tiny-vit --image-size 32 for the demo's encoder")
    ap.add_argument("--pixel200k", type=float, default=0.0, metavar="SCALE",
                    help="data of the Pixel200K shape at this scale (benchmarks/pixel200k.py), e.g. 0.1")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="keep data/cache/runs/results here (default: a temp dir); "
                    "a rerun reuses the result of every fit whose settings are unchanged")
    ap.add_argument("--refit", action="store_true", help="fit again even where a result file exists")
    ap.add_argument("--report", action="store_true", help="fit nothing: report the (tower, seed) fits of --workdir "
                    "that have a result file (e.g. more seeds for some towers than for others)")
    ap.add_argument("--plot", default="", help="write the cost/quality plot here (PNG)")
    ap.add_argument("--cls-only", action="store_true",
                    help="time partial's step with the class-token-only last block against the full one (old path)")
    ap.add_argument("--steps", type=int, default=5, help="--cls-only: timed steps (after one warm-up step)")
    ap.add_argument("--step-items", type=int, default=8, help="--cls-only: items encoded per step")
    args = ap.parse_args()
    towers = [t for t in args.towers.split(",") if t]
    if unknown := [t for t in towers if t not in TOWERS]:
        ap.error(f"--towers: unknown {', '.join(unknown)}; expected some of {', '.join(TOWERS)}")
    if args.demo and args.pixel200k:
        ap.error("--demo and --pixel200k pick different data: give one")

    from pixelrec.runtime import set_quiet

    set_quiet(True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pixelrec-fitcost-"))
    interactions, covers, what = make_data(args, work)
    cache, encode_s = encode(args, covers, interactions, work, "cls", args.split_block)

    if args.cls_only:
        r = time_cls_only(str(interactions), str(cache), args.dim, args.steps, args.step_items)
        print(f"\npartial, last block for the class token only: {args.model} @ {args.image_size}px, top "
              f"{args.split_block} blocks trained, {args.step_items} items a step, median of {args.steps} steps")
        print(f"{'old s/step':>11}{'cls-only s/step':>17}{'old/cls-only':>14}{'max rel diff':>14}")
        print(f"{r['old_s_per_step']:>11.4f}{r['cls_only_s_per_step']:>17.4f}{r['speedup']:>14.2f}"
              f"{r['max_rel_diff']:>14.1e}")
        print(json.dumps(r))
        return

    caches = {"cache": (cache, encode_s)}
    if any(TOWERS[t].get(CACHE) == "mean" for t in towers):
        caches["mean"] = encode(args, covers, interactions, work, "cls+mean", None)
    sizes = {kind: dataset_bytes(path) for kind, (path, _) in caches.items()}
    if args.demo:  # the demo's settings (--epochs: a cap)
        fit_settings = {**DEMO_FIT, **({"train.epochs": args.epochs} if args.epochs != ap.get_default("epochs") else {})}
    elif args.pixel200k:  # pixelrec's defaults, as benchmarks/pixel200k.py fits (--epochs: 1 there)
        fit_settings = {"train.epochs": args.epochs, "train.patience": args.epochs}
    else:
        fit_settings = {"model.dim": args.dim, "model.max_len": args.max_len, "train.epochs": args.epochs,
                        "train.patience": args.epochs, "train.batch_size": args.batch_size}
    rows: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in towers:
            kind = TOWERS[name].get(CACHE, "cache")
            child = dict(name=name, interactions=str(interactions), cache=str(caches[kind][0]), images=str(covers),
                         model=args.model, image_size=args.image_size, k=args.split_block, seed=seed,
                         device=args.device, out=str(work / "runs" / f"{name}-seed{seed}"),
                         set={**fit_settings, **{k: v for k, v in TOWERS[name].items() if k != CACHE}})
            result = work / "results" / f"{name}-seed{seed}.json"
            if args.report:  # only what was fitted with these settings
                r = json.loads(result.read_text()) if result.is_file() else {}
                if r.get("args") != child:
                    continue
            else:
                r = cached_child(child, result, args.refit)
            r["cache_bytes"] = sum(sizes[kind].get(d, 0) for d in tower_reads(name))
            print(f"  seed {seed} {name:<15} {r['s_per_epoch']:.2f} s/epoch  N@10 {r['ndcg@10']:.4f}  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            rows.setdefault(name, []).append(r)
    if not rows:
        raise SystemExit(f"{work}: no result file of these towers and seeds")
    summary = summarize(rows)

    print(f"\nfit cost: SASRec on {what}; {args.model} @ {args.image_size}px random init, top {args.split_block} "
          f"blocks trained by partial/e2e, device {args.device}, seeds {args.seeds}")
    print("(one-off encodes, or their reuse: " + ", ".join(f"{k} {s:.1f}s" for k, (_, s) in caches.items()) + "; stored bytes: "
          + "; ".join(f"{k}: " + ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sizes[k].items()
                                                if d in ("embeddings", "tokens", "hidden")) for k in sizes) + ")")
    print(table(summary))
    for base in ("frozen", "e2e"):
        if base in summary:
            print(f"s/epoch / {base}: " + ", ".join(f"{n} {s['s_per_epoch'][0] / summary[base]['s_per_epoch'][0]:.3f}"
                                                   for n, s in summary.items() if n != base))
    for line in target_lines(summary):
        print(line)
    if args.plot:
        plot_frontier(summary, args.plot, f"SASRec on {what.split(' (')[0]}, {args.model} {args.image_size}px, "
                      f"{max(len(r) for r in rows.values())} seed(s)")
        print(f"plot: {args.plot}")
    print(json.dumps({n: [{k: v for k, v in r.items() if k != "args"} for r in rs] for n, rs in rows.items()}))


if __name__ == "__main__":
    main()
