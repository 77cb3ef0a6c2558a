"""pixelrec's default sequence models (SASRec, GRU4Rec, NextItNet, LightSANs, SR-GNN) vs RecBole 1.2.1 on MovieLens-100K (PixelRec's protocol, docs/protocol.md).

Runs `pixelrec fit --items id --model M` with DEFAULT settings on a PixelRec-format ML-100K CSV
(leave-one-out by time, full ranking over all items, the user's history excluded, test metrics at
the best validation NDCG@10 epoch) and prints our figures beside RecBole's, with wall-clock time.

    python benchmarks/ml100k.py PATH/TO/ml100k.csv [--models sasrec,gru4rec|all] [--seeds 0,1,2] [--out runs/ml100k]
                                [--set model.positions=absolute --set train.stride=10 ...]

`--set section.field=value` changes one setting from its default (ablations); the defaults are
what `pixelrec fit` uses without options.

With several seeds it also prints the mean and standard deviation over seeds: with 943 test users
a single figure carries a sampling error of about +-0.008 NDCG@10.

The RecBole figures are those published with the CSV (max length 10 and 50, dim 64, CE loss, early
stop on valid NDCG@10, patience 10; RecBole's ranking made to exclude history). The data is not
shipped with pixelrec (GroupLens terms): pass its path. No RecBole figures are published with the
CSV for NextItNet, LightSANs and SR-GNN yet; for them only ours are printed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# model -> list of (setting, test NDCG@10, test Recall@10)
RECBOLE = {
    "sasrec": [("L10", 0.1115, 0.2100), ("L50", 0.1056, 0.2142), ("L10, BPR", 0.0847, 0.1644)],
    "gru4rec": [("L10", 0.1019, 0.2089), ("L50", 0.1087, 0.2068)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ML-100K in PixelRec CSV format (item_id,user_id,timestamp)")
    ap.add_argument("--models", default="sasrec,gru4rec", help="comma-separated, or all (every `fit --model`)")
    ap.add_argument("--out", default="runs/ml100k", help="directory for the run dirs")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="change a setting from its default, e.g. model.positions=absolute (repeatable)")
    args = ap.parse_args()

    from pixelrec.recommend.config import MODELS, FitConfig
    from pixelrec.runs.fit import fit

    models = list(MODELS) if args.models == "all" else args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)} or all")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for model in models:
        for seed in seeds:
            cfg = FitConfig(interactions=args.csv, out=f"{args.out}/{model}-seed{seed}")
            cfg.model.model = model
            cfg.train.seed, cfg.train.device = seed, args.device
            for item in args.overrides:
                _override(cfg, item)
            t0 = time.time()
            res = fit(cfg, overwrite=True)
            wall = time.time() - t0
            t = res.test["overall"]
            rows.append({"model": model, "seed": seed, "ndcg@10": t["ndcg@10"], "recall@10": t["recall@10"],
                         "best_epoch": res.best_epoch, "epochs": res.epochs_run, "seconds": round(wall, 1),
                         "s_per_epoch": round(res.seconds_per_epoch, 2)})

    print("\nML-100K, leave-one-out, full ranking, history excluded; test metrics at best valid NDCG@10")
    if args.overrides:
        print(f"changed from the defaults: {', '.join(args.overrides)}")
    print(f"{'':<28}{'NDCG@10':>9}{'Recall@10':>11}{'best/run':>10}{'wall s':>9}{'s/epoch':>9}")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        for r in mine:
            print(f"pixelrec {model:<9} seed {r['seed']:<3}{r['ndcg@10']:>9.4f}{r['recall@10']:>11.4f}"
                  f"{r['best_epoch']:>5}/{r['epochs']:<4}{r['seconds']:>9.0f}{r['s_per_epoch']:>9.2f}")
        n_mean = float(np.mean([r["ndcg@10"] for r in mine]))
        r_mean = float(np.mean([r["recall@10"] for r in mine]))
        if len(mine) > 1:
            print(f"pixelrec {model:<9} mean    {n_mean:>9.4f}{r_mean:>11.4f}   "
                  f"(sd {np.std([r['ndcg@10'] for r in mine], ddof=1):.4f} / "
                  f"{np.std([r['recall@10'] for r in mine], ddof=1):.4f})")
        if model not in RECBOLE:
            continue
        for setting, n, rc in RECBOLE[model]:
            print(f"  RecBole {model} {setting:<12}{n:>9.4f}{rc:>11.4f}")
        best_n = max(x[1] for x in RECBOLE[model])
        best_r = max(x[2] for x in RECBOLE[model])
        meets = sum(r["ndcg@10"] >= best_n and r["recall@10"] >= best_r for r in mine)
        print(f"  mean / best RecBole: NDCG@10 {n_mean / best_n:.3f}, Recall@10 {r_mean / best_r:.3f}; "
              f"{meets} of {len(mine)} runs meet both bars")
    print(json.dumps(rows))


def _override(cfg, item: str) -> None:
    """Apply one "section.field=value" to a FitConfig, converting value to the field's type."""
    import dataclasses

    key, _, value = item.partition("=")
    section, _, name = key.partition(".")
    obj = getattr(cfg, section, None)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if name not in fields or not value:
        raise SystemExit(f"--set {item!r}: expected SECTION.FIELD=VALUE with a field of FitConfig")
    kind = str(fields[name].type)
    converted = (int(value) if kind.startswith("int") else float(value) if kind.startswith("float")
                 else value.lower() in ("1", "true", "yes") if kind.startswith("bool") else value)
    setattr(obj, name, converted)


if __name__ == "__main__":
    main()
