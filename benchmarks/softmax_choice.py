"""The softmax cost rule against measured training steps (`--softmax auto`, docs/performance.md).

For catalogues of several sizes (random sequences, id tower, default SASRec or GRU4Rec, batch 128)
it prints what the rule models on CPU (trained positions per step, the full softmax's share of a
step, the negatives it weighs, the modelled saving of a sampled step and its choice) beside measured
steps (forward, backward and AdamW; median of 20 after 5 warm-up steps, one thread): the full
softmax's step, the sampled softmax's step with the weighed negatives, and the full softmax's
measured share of its step, taken as 1 - (the step without any softmax) / (the full step). The rule
samples where the modelled saving is at least 3x (`losses.MIN_SAVING`); the measured full / sampled
column is the saving it models. Test quality of the choice: benchmarks/softmax_quality.py.

    python benchmarks/softmax_choice.py [--items 1682,5000,10000,30000,96282] [--model sasrec]

With `--parity CSV` it measures quality instead: `fit` on the CSV with the default `--softmax auto`
against `--softmax full` (or `--arms` of your choice, e.g. `negatives=64,full`) for each seed, and
prints test NDCG@10 / Recall@10 per seed and their mean +- sd (sample sd over the seeds).

    python benchmarks/softmax_choice.py --parity data/interactions.csv --seeds 0,1,2 [--epochs 40 --patience 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch


def random_data(n_items: int, seed: int = 0):
    """Users with 8..39 interactions on uniformly random items (every item at least once)."""
    from pixelrec.data.sequences import build_sequences

    rng = np.random.default_rng(seed)
    users = max(3000, n_items // 8)
    lengths = rng.integers(8, 40, users)
    items = rng.integers(0, n_items, lengths.sum())
    items[:n_items] = rng.permutation(n_items)
    user = np.repeat(np.arange(users), lengths)
    return build_sequences(pd.DataFrame({"item_id": [f"i{i}" for i in items], "user_id": [f"u{u}" for u in user],
                                         "timestamp": np.arange(len(items))}))


def step_ms(data, model: str, softmax: str, negatives: int = 0, steps: int = 25, no_softmax: bool = False) -> float:
    """Median ms of a training step (loss, backward, AdamW) over the first `steps` batches, 5 dropped."""
    from pixelrec.recommend.batches import iterate_batches, training_windows
    from pixelrec.recommend.build import build_optimizer, build_recommender
    from pixelrec.recommend.config import FitConfig

    cfg = FitConfig(interactions="-", out="-")
    cfg.model.model, cfg.loss.softmax, cfg.loss.negatives = model, softmax, negatives
    cfg.resolve_defaults()
    torch.manual_seed(0)
    rec = build_recommender(cfg, data)
    opt = build_optimizer(rec, cfg)
    windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i, (seq, trained) in enumerate(iterate_batches(windows, cfg.train.batch_size, gen)):
        if i >= steps:
            break
        start = time.perf_counter()
        if no_softmax:  # the sequence model and the tower alone: a loss that touches every state once
            inputs = seq[:, :-1]
            uniq, inv = torch.unique(inputs, return_inverse=True)
            loss = rec.states(rec.tower(uniq)[inv], inputs).square().mean()
        else:
            loss = rec.training_loss(seq, None, None, trained, uniform=rec.draw_uniform_negatives(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[5:]))


def parity(csv: str, arms: list[str], seeds: list[int], epochs: int, patience: int, out: str) -> None:
    """fit each arm (auto | full | sampled | negatives=N) with each seed; per-seed rows, then mean +- sd."""
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    rows = []
    print("| arm | seed | softmax (negatives) | test NDCG@10 | test Recall@10 | best / run epochs | s/epoch |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for arm in arms:
        for seed in seeds:
            cfg = FitConfig(interactions=csv, out=f"{out}/{arm.replace('=', '')}-seed{seed}")
            if arm.startswith("negatives="):
                cfg.loss.negatives = int(arm.split("=")[1])
            else:
                cfg.loss.softmax = arm
            cfg.train.seed, cfg.train.epochs, cfg.train.patience, cfg.train.device = seed, epochs, patience, "cpu"
            result = fit(cfg, overwrite=True)
            t = result.test["overall"]
            rows.append((arm, t["ndcg@10"], t["recall@10"]))
            print(f"| {arm} | {seed} | {cfg.loss.softmax} ({cfg.loss.negatives}) | {t['ndcg@10']:.4f} | "
                  f"{t['recall@10']:.4f} | {result.best_epoch} / {result.epochs_run} | "
                  f"{result.seconds_per_epoch:.1f} |",
                  flush=True)
    print("\n| arm | seeds | NDCG@10 mean +- sd | Recall@10 mean +- sd |\n|---|---:|---:|---:|")
    for arm in arms:
        n = np.array([r[1] for r in rows if r[0] == arm])
        r = np.array([r[2] for r in rows if r[0] == arm])
        sd = (lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)
        print(f"| {arm} | {len(n)} | {n.mean():.4f} +- {sd(n):.4f} | {r.mean():.4f} +- {sd(r):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="1682,5000,10000,30000,96282")
    ap.add_argument("--model", default="sasrec", choices=("sasrec", "gru4rec"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parity", default=None, metavar="CSV", help="compare test quality of the arms on this CSV")
    ap.add_argument("--arms", default="auto,full",
                    help="--parity: auto | full | sampled | negatives=N, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--out", default="runs/softmax-parity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.parity:
        from pixelrec.runtime import set_quiet

        set_quiet(True)
        parity(args.parity, args.arms.split(","), [int(s) for s in args.seeds.split(",")], args.epochs,
               args.patience, args.out)
        return
    from pixelrec.recommend.build import build_tower, mean_trained_per_window, softmax_plan
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runtime import set_quiet

    set_quiet(True)
    print(f"{args.model}, id tower, defaults, batch 128, {args.threads} thread(s)")
    print("| items | positions/step | modelled full share | modelled saving | rule | full step ms | "
          "no-softmax step ms | measured full share | sampled step ms (weighed negatives) | full / sampled |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in args.items.split(",")]:
        data = random_data(n)
        cfg = FitConfig(interactions="-", out="-")
        cfg.model.model = args.model
        cfg.resolve_defaults()
        plan = softmax_plan(cfg, data, build_tower(cfg, data))
        negatives = plan.negatives or 1024
        full = step_ms(data, args.model, "full")
        bare = step_ms(data, args.model, "full", no_softmax=True)
        sampled = step_ms(data, args.model, "sampled", negatives)
        rule = "full" if plan.full else f"sampled, {plan.negatives} negatives"
        print(f"| {n:,} | {cfg.train.batch_size * mean_trained_per_window(cfg, data):.0f} | {plan.full_share:.2f} | "
              f"{plan.saving:.1f}x | {rule} | {full:.1f} | {bare:.1f} | {1 - bare / full:.2f} | "
              f"{sampled:.1f} ({negatives}) | {full / sampled:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
