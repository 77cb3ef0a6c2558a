"""Cost of the image towers: seconds/epoch and peak memory of frozen, partial and e2e.

All three train the same SASRec on the same synthetic data with the same encoder; `partial` uses
the cache's split-block tokens and trains the top K blocks, `e2e` runs the whole encoder on the
covers every step and trains its top K blocks (the reference PixelNet setting), `frozen` trains
only an adapter on the cached pooled embedding. Each fit runs in its own process so its peak RSS
(Linux VmHWM) and peak CUDA memory on a GPU are its own. Prints the ratios partial/e2e and frozen/e2e and the
final NDCG@10 of each.

`--cls-only` instead times `partial`'s item-tower training step (forward, backward and an Adam step
of the top blocks and head on `--step-items` items) with the last block run for the class token only
(the default wherever the pooled output reads token 0) against the full last block (the old path,
forced by `image_towers.CLS_ONLY_LAST_BLOCK = False`), side by side in one process, interleaved.

    python benchmarks/fit_cost.py [--model ViT-B-32 --image-size 64 --split-block 2 --epochs 3]
    python benchmarks/fit_cost.py --cls-only --model ViT-B-32 --image-size 224 --items 40 --steps 5
"""

from __future__ import annotations

import argparse
import json
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
cfg.items.kind = a["kind"]
cfg.items.cache = a["cache"] if a["kind"] in ("frozen", "partial") else None
if a["kind"] == "e2e":
    cfg.items.images, cfg.items.encoder, cfg.items.tune_blocks = a["images"], a["model"], a["k"]
    cfg.items.image_size = a["image_size"]  # the cache's input size, so e2e and partial compute the same function
cfg.model.dim, cfg.model.max_len = a["dim"], a["max_len"]
cfg.train.epochs, cfg.train.patience, cfg.train.device = a["epochs"], a["epochs"], a["device"]
cfg.train.batch_size = a["batch_size"]
r = fit(cfg, overwrite=True)
peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
# VmHWM: this process's own peak RSS (ru_maxrss of a child would include the parent's RSS at fork)
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print("RESULT " + json.dumps({"s_per_epoch": r.seconds_per_epoch, "ndcg@10": r.test["overall"]["ndcg@10"],
                              "valid_ndcg@10": r.valid["ndcg@10"], "peak_cuda": peak_cuda, "peak_rss_mb": hwm / 1024}))
"""


def run_child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args['kind']} fit failed (exit {proc.returncode})")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model (random init)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--split-block", type=int, default=2, help="K: blocks trained by partial and e2e")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="keep data/cache/runs here (default: a temp dir)")
    ap.add_argument("--cls-only", action="store_true",
                    help="time partial's step with the class-token-only last block against the full one (old path)")
    ap.add_argument("--steps", type=int, default=5, help="--cls-only: timed steps (after one warm-up step)")
    ap.add_argument("--step-items", type=int, default=8, help="--cls-only: items encoded per step")
    args = ap.parse_args()

    from pixelrec.data.synth import SynthConfig, synthesize
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images
    from pixelrec.runtime import set_quiet

    set_quiet(True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pixelrec-fitcost-"))
    data = work / "data"
    if not (data / "interactions.csv").is_file():
        synthesize(data, SynthConfig(users=args.users, items=args.items, cold_items=max(1, args.items // 20),
                                     image_size=max(args.image_size, 32), styles=6))
    cache = work / f"cache-{args.model}-{args.image_size}-k{args.split_block}.h5"
    t = time.time()
    encode_images(EncodeConfig(images=str(data / "covers"), out=str(cache), interactions=str(data / "interactions.csv"),
                               encoder=EncoderConfig(model=args.model, image_size=args.image_size),
                               split_block=args.split_block, device=args.device, num_workers=0))
    encode_s = time.time() - t

    if args.cls_only:
        r = time_cls_only(str(data / "interactions.csv"), str(cache), args.dim, args.steps, args.step_items)
        print(f"\npartial, last block for the class token only: {args.model} @ {args.image_size}px, top "
              f"{args.split_block} blocks trained, {args.step_items} items a step, median of {args.steps} steps")
        print(f"{'old s/step':>11}{'cls-only s/step':>17}{'old/cls-only':>14}{'max rel diff':>14}")
        print(f"{r['old_s_per_step']:>11.4f}{r['cls_only_s_per_step']:>17.4f}{r['speedup']:>14.2f}"
              f"{r['max_rel_diff']:>14.1e}")
        print(json.dumps(r))
        return

    common = dict(interactions=str(data / "interactions.csv"), cache=str(cache), images=str(data / "covers"),
                  model=args.model, image_size=args.image_size, k=args.split_block, dim=args.dim,
                  max_len=args.max_len, epochs=args.epochs,
                  batch_size=args.batch_size, device=args.device)
    res = {kind: run_child(dict(common, kind=kind, out=str(work / f"run_{kind}"))) for kind in ("frozen", "partial", "e2e")}

    print(f"\nfit cost: {args.model} @ {args.image_size}px, top {args.split_block} blocks trained, "
          f"{args.users} users x {args.items} items, {args.epochs} epochs, device {args.device}")
    print(f"(one-off encode of the cache with tokens: {encode_s:.1f}s)")
    print(f"{'tower':<9}{'s/epoch':>9}{'peak RSS MB':>13}{'peak CUDA MB':>14}{'valid N@10':>12}{'test N@10':>11}")
    for kind, r in res.items():
        print(f"{kind:<9}{r['s_per_epoch']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['peak_cuda'] / 2**20:>14.0f}"
              f"{r['valid_ndcg@10']:>12.4f}{r['ndcg@10']:>11.4f}")
    e2e = res["e2e"]
    for kind in ("partial", "frozen"):
        r = res[kind]
        print(f"{kind}/e2e: time {r['s_per_epoch'] / e2e['s_per_epoch']:.3f}, "
              f"peak RSS {r['peak_rss_mb'] / e2e['peak_rss_mb']:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
