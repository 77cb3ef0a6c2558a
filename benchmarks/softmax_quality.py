"""Quality and fit time of `--softmax auto` against `--softmax full` (docs/performance.md, "The softmax").

Synthetic catalogues with sequential structure: every item has 3 successors (drawn by a Zipf(0.8)
popularity; followed with weights 0.6 / 0.3 / 0.1); each next item of a user is a successor of the
current one with probability 0.6 (a new item: repeats are replaced by a jump), else a jump to the
next item of a shuffled pass over the whole catalogue (so every item occurs). Users have 10..30
items; there are 1.75 interactions per item (users = 1.75 x items / 20). What there is to learn is
item-to-item transitions, not popularity alone: 60% of the test targets follow from the previous
item, 40% are unpredictable jumps.

For each catalogue size it prints the cost rule's plan on CPU (saving, negatives, choice), then fits
`--softmax full` and, where the rule samples, `--softmax auto` (the rule's choice), with SASRec
defaults for `--epochs E --patience E` (a fixed number of epochs: the budget of a 2-core machine),
one thread, seeds 0, 1, 2. Where the rule picks the full softmax the two arms are the same run, and
only `full` is fitted. Each finished fit appends a JSON line to OUT/results.jsonl; `--summary`
prints the tables from it (mean +- sample sd over seeds; several OUTs, comma-separated, together).

    nice -n 5 python benchmarks/softmax_quality.py --sizes 10000:3,25000:2,50000:1,100000:1 --seeds 0,1,2
    python benchmarks/softmax_quality.py --summary
    python benchmarks/softmax_quality.py --csv /path/ml100k.csv --sizes ml100k:200   # a real CSV instead

Several processes may share OUT (e.g. one per size): each fit's line is appended whole.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SUCCESSOR_WEIGHTS = (0.6, 0.3, 0.1)


def transition_interactions(n_items: int, seed: int = 0, p_follow: float = 0.6, zipf: float = 0.8,
                            per_item: float = 1.75, min_len: int = 10, max_len: int = 30) -> pd.DataFrame:
    """Users that follow item-to-item transitions (module doc); columns item_id, user_id, timestamp."""
    rng = np.random.default_rng(seed)
    users = int(round(per_item * n_items / ((min_len + max_len) / 2)))
    lengths = rng.integers(min_len, max_len + 1, users)
    popularity = 1.0 / np.arange(1, n_items + 1) ** zipf
    popularity = (popularity / popularity.sum())[rng.permutation(n_items)]
    successors = rng.choice(n_items, size=(n_items, len(SUCCESSOR_WEIGHTS)), p=popularity)
    total = int(lengths.sum())
    follow = rng.random(total) < p_follow
    which = rng.choice(len(SUCCESSOR_WEIGHTS), size=total, p=SUCCESSOR_WEIGHTS)
    passes = [rng.permutation(n_items) for _ in range(total // n_items + 2)]
    jumps = iter(np.concatenate(passes).tolist())
    items = np.empty(total, dtype=np.int64)
    k = 0
    for length in lengths.tolist():
        seen: set[int] = set()
        current = next(jumps)
        for _ in range(length):
            while current in seen:
                current = next(jumps)
            items[k] = current
            seen.add(current)
            current = int(successors[current, which[k]]) if follow[k] else next(jumps)
            k += 1
    user = np.repeat(np.arange(users), lengths)
    return pd.DataFrame({"item_id": [f"i{i}" for i in items], "user_id": [f"u{u}" for u in user],
                         "timestamp": np.arange(total)})


def dataset(size: str, out: Path, csv: str | None) -> str:
    """The CSV of one size: the synthetic set (written once under OUT) or the given real CSV."""
    if csv:
        return csv
    path = out / f"transitions-{size}.csv"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        transition_interactions(int(size)).to_csv(tmp, index=False)
        tmp.rename(path)
    return str(path)


def plan_of(csv: str) -> dict:
    """The cost rule's plan on CPU for SASRec defaults on this CSV (what `--softmax auto` will pick)."""
    from pixelrec.data.sequences import load_sequences
    from pixelrec.recommend.build import build_tower, mean_trained_per_window, softmax_plan
    from pixelrec.recommend.config import FitConfig

    data = load_sequences(csv, 3)
    cfg = FitConfig(interactions=csv, out="-")
    cfg.resolve_defaults()
    plan = softmax_plan(cfg, data, build_tower(cfg, data), "cpu")
    return {"items": int((data.train_counts[1:] > 0).sum()), "users": int(data.num_users),
            "interactions": int(data.num_interactions),
            "positions": round(cfg.train.batch_size * mean_trained_per_window(cfg, data)),
            "full": plan.full, "negatives": plan.negatives, "saving": round(plan.saving, 2), "reason": plan.reason}


def fit_one(csv: str, arm: str, seed: int, epochs: int, patience: int, out: Path) -> dict:
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    cfg = FitConfig(interactions=csv, out=str(out / "runs" / f"{Path(csv).stem}-{arm}-seed{seed}"))
    cfg.loss.softmax = "full" if arm == "full" else "auto"
    cfg.train.seed, cfg.train.epochs, cfg.train.patience, cfg.train.device = seed, epochs, patience, "cpu"
    start = time.time()
    result = fit(cfg, overwrite=True)
    t = result.test["overall"]
    return {"softmax": cfg.loss.softmax, "trained_negatives": cfg.loss.negatives, "ndcg@10": t["ndcg@10"],
            "recall@10": t["recall@10"], "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "fit_s": round(time.time() - start, 1), "train_s_per_epoch": round(result.seconds_per_epoch, 1)}


def run(sizes: list[tuple[str, int]], seeds: list[int], arms: list[str], out: Path, csv: str | None,
        patience: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for size, epochs in sizes:
        path = dataset(size, out, csv)
        plan = plan_of(path)
        print(f"{size}: {json.dumps(plan)}", flush=True)
        for arm in arms:
            if arm == "rule" and plan["full"]:
                print(f"{size}: the rule picks full: the rule's arm is the full arm's run", flush=True)
                continue
            for seed in seeds:
                row = {"size": size, "arm": arm, "seed": seed, "epochs": epochs, **plan,
                       **fit_one(path, arm, seed, epochs, patience or epochs, out)}
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def summary(outs: list[Path]) -> None:
    """Mean +- sample sd over seeds of each (size, arm, epochs, negatives trained with), from every OUT."""
    rows = [json.loads(line) for out in outs for line in (out / "results.jsonl").read_text().splitlines()
            if line.strip()]
    for r in rows:  # rows from before "trained_negatives" existed hold it in "negatives"
        r.setdefault("trained_negatives", r["negatives"])
    sd = (lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)
    print("| size | items (train) | interactions | positions / step | arm | negatives | epochs | seeds | "
          "NDCG@10 | Recall@10 | fit s | train s / epoch |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    keys = dict.fromkeys((r["size"], r["arm"], r["epochs"], r["trained_negatives"]) for r in rows)
    order = (lambda k: (int(k[0]) if k[0].isdigit() else -1, k[1], k[2], k[3]))  # real CSVs first, then by size
    for size, arm, epochs, negatives in sorted(keys, key=order):
        group = [r for r in rows if (r["size"], r["arm"], r["epochs"], r["trained_negatives"]) == (size, arm, epochs,
                                                                                                 negatives)]
        g = group[0]
        n, rc = [r["ndcg@10"] for r in group], [r["recall@10"] for r in group]
        fs, es = [r["fit_s"] for r in group], [r["train_s_per_epoch"] for r in group]
        print(f"| {size} | {g['items']:,} | {g['interactions']:,} | {g['positions']:,} | {arm} ({g['softmax']}) | "
              f"{negatives or '-'} | {epochs} | {len(group)} | {np.mean(n):.4f} +- {sd(n):.4f} | "
              f"{np.mean(rc):.4f} +- {sd(rc):.4f} | {np.mean(fs):.0f} | {np.mean(es):.1f} |")
    print("\nper seed (NDCG@10 / Recall@10 / fit s):")
    for r in rows:
        print(f"  {r['size']} {r['arm']} {r['trained_negatives'] or '-'} negatives, {r['epochs']} epochs, seed "
              f"{r['seed']}: {r['ndcg@10']:.4f} / {r['recall@10']:.4f} / {r['fit_s']:.0f} (best epoch "
              f"{r['best_epoch']} of {r['epochs_run']}); rule: {r['reason']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000:3,25000:2,50000:1,100000:1",
                    help="catalogue sizes with their epochs, SIZE:EPOCHS comma-separated (a label with --csv)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="full,rule", help="full and/or rule (the rule's choice, --softmax auto)")
    ap.add_argument("--csv", default=None, help="fit this interactions CSV instead of synthetic sets")
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: the epochs)")
    ap.add_argument("--out", default="runs/softmax-quality",
                    help="where the data, runs and results.jsonl go (--summary: several, comma-separated)")
    ap.add_argument("--summary", action="store_true", help="print the tables from OUT/results.jsonl")
    args = ap.parse_args()
    if args.summary:
        summary([Path(o) for o in args.out.split(",")])
        return
    from pixelrec.runtime import set_quiet

    torch.set_num_threads(1)
    set_quiet(True)
    sizes = [(s.split(":")[0], int(s.split(":")[1])) for s in args.sizes.split(",")]
    run(sizes, [int(s) for s in args.seeds.split(",")], args.arms.split(","), Path(args.out), args.csv, args.patience)


if __name__ == "__main__":
    main()
