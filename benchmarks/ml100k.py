"""pixelrec's sequence models vs RecBole 1.2.1 on MovieLens-100K (PixelRec's protocol, docs/protocol.md).

Runs `pixelrec fit --items id --model M` with DEFAULT settings on a PixelRec-format ML-100K CSV
(leave-one-out by time, full ranking over all items, the user's history excluded, test metrics at
the best validation NDCG@10 epoch) and prints our figures beside RecBole's, with epoch times.

    python benchmarks/ml100k.py PATH/TO/ml100k.csv [--models sasrec,gru4rec|all] [--seeds 0,1,2] [--out runs/ml100k]
                                [--set model.positions=absolute --set train.stride=10 ...]
                                [--peer recbole [--peer-venv DIR] [--peer-seeds 0] [--peer-epochs N]
                                 [--peer-max-minutes M] [--peer-only]]

`--set section.field=value` changes one setting from its default (ablations); the defaults are
what `pixelrec fit` uses without options.

`--peer recbole` also trains the same model in RecBole 1.2.1, in its own virtualenv (make it with
`bash benchmarks/peers/make_recbole_venv.sh [DIR]`), through benchmarks/peers/recbole_run.py: same
split, full ranking with the history masked (RecBole 1.2.1 does not mask it for sequential models; the
peer script does), pixelrec's max length and dim, CE loss, early stop on valid NDCG@10 with pixelrec's
patience. It prints NDCG@10, Recall@10 and s/epoch (training only) for both, and the ratios ours/peer.
`--peer-epochs` / `--peer-max-minutes` cap RecBole's schedule (it is slow on CPU); the table marks
capped runs. Every result is cached per (side, model, seed) under --out/results and reused by a rerun
with the same settings (`--peer-only` runs only the peer and reads our figures from that cache); a
cached pixelrec result whose run recorded other settings than today's defaults give is fitted again.

With several seeds it also prints the mean and standard deviation over seeds: with 943 test users
a single figure carries a sampling error of about +-0.008 NDCG@10. Without --peer it prints the RecBole
figures published with the CSV (SASRec and GRU4Rec only). The data is not shipped with pixelrec
(GroupLens terms): pass its path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_settings import changed_settings  # noqa: E402

# model -> list of (setting, test NDCG@10, test Recall@10): RecBole figures published with the CSV
RECBOLE = {
    "sasrec": [("L10", 0.1115, 0.2100), ("L50", 0.1056, 0.2142), ("L10, BPR", 0.0847, 0.1644)],
    "gru4rec": [("L10", 0.1019, 0.2089), ("L50", 0.1087, 0.2068)],
}
PEERS = ("none", "recbole")
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "recbole_run.py"
# the sequential models and MF (RecBole's BPR); recbole_run.RECBOLE_MODELS names their RecBole classes (FM,
# DSSM and VBPR have no RecBole counterpart under this protocol: RecBole's FM/DSSM are CTR models)
PEER_MODELS = ("sasrec", "gru4rec", "nextitnet", "lightsans", "srgnn", "bert4rec", "mf")


def parse_args(argv=None, models=None) -> argparse.Namespace:
    """Parse and check the command line; `models` = the `fit --model` choices (pixelrec's registry)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ML-100K in PixelRec CSV format (item_id,user_id,timestamp)")
    ap.add_argument("--models", default="sasrec,gru4rec", help="comma-separated, or all (every `fit --model`)")
    ap.add_argument("--out", default="runs/ml100k", help="directory for the run dirs and cached results")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="change a setting from its default, e.g. model.positions=absolute (repeatable)")
    ap.add_argument("--refit", action="store_true", help="ignore cached results")
    peer = ap.add_argument_group("peer")
    peer.add_argument("--peer", default="none", choices=PEERS, help="also train the same model in this library")
    peer.add_argument("--peer-venv", default="/work/peers/recbole",
                      help="RecBole's virtualenv (benchmarks/peers/make_recbole_venv.sh)")
    peer.add_argument("--peer-seeds", default=None, help="seeds of the peer runs (default: --seeds)")
    peer.add_argument("--peer-epochs", type=int, default=200, help="cap on the peer's epochs")
    peer.add_argument("--peer-max-minutes", type=float, default=0,
                      help="cap on one peer run's wall time: it stops after the epoch that passes it (0 = none)")
    peer.add_argument("--peer-only", action="store_true",
                      help="run only the peer; our figures come from cached results where there are some")
    args = ap.parse_args(argv)
    models = list(models or PEER_MODELS)
    args.models = models if args.models == "all" else [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(models))
    if unknown or not args.models:
        ap.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; expected some of {', '.join(models)} or all")
    args.seeds = _seeds(ap, "--seeds", args.seeds)
    args.peer_seeds = args.seeds if args.peer_seeds is None else _seeds(ap, "--peer-seeds", args.peer_seeds)
    if args.peer_epochs < 1:
        ap.error(f"--peer-epochs must be at least 1, not {args.peer_epochs}")
    if args.peer_max_minutes < 0:
        ap.error(f"--peer-max-minutes must be 0 (none) or more, not {args.peer_max_minutes}")
    if args.peer_only and args.peer == "none":
        ap.error("--peer-only needs --peer recbole")
    if args.peer == "recbole":
        if not peer_python(args.peer_venv).is_file():
            ap.error(f"--peer-venv {args.peer_venv}: no bin/python there; make it with "
                     f"`bash benchmarks/peers/make_recbole_venv.sh {args.peer_venv}`")
    return args


def _seeds(ap: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated integers such as 0,1,2")
    if any(s < 0 for s in seeds):
        ap.error(f"{flag} {text!r}: seeds are 0 or more")
    return seeds


def peer_python(venv: str) -> Path:
    return Path(venv) / "bin" / "python"


def main() -> None:
    from pixelrec.recommend.config import MODELS

    args = parse_args(models=list(MODELS))
    out = Path(args.out)
    ours, peers = [], []
    for model in args.models:
        for seed in args.seeds:
            row = run_ours(model, seed, args, out, cached_only=args.peer_only)
            if row:
                ours.append(row)
        if args.peer == "recbole" and model in PEER_MODELS:
            for seed in args.peer_seeds:
                peers.append(run_peer(model, seed, args, out))
    print("\nML-100K, leave-one-out, full ranking, history excluded; test metrics at best valid NDCG@10")
    if args.overrides:
        print(f"changed from the defaults: {', '.join(args.overrides)}")
    lines = table(ours, peers, args.models) if args.peer == "recbole" else published_table(ours, args.models)
    print("\n".join(lines))
    print(json.dumps(ours + peers))


# ------------------------------------------------------------------------------------------ runs
def run_ours(model: str, seed: int, args, out: Path, cached_only: bool = False) -> dict | None:
    """Fit pixelrec's model on one seed (or reuse its cached result) -> its row."""
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    key = {"overrides": sorted(args.overrides), "csv": _file_key(args.csv)}
    result_file = out / "results" / f"pixelrec-{model}-seed{seed}.json"
    cfg = FitConfig(interactions=args.csv, out=str(out / f"{model}-seed{seed}"))
    cfg.model.model = model
    cfg.train.seed, cfg.train.device = seed, args.device
    for item in args.overrides:
        _override(cfg, item)
    cached = _cached(result_file, key, args.refit)
    changed = changed_settings(cfg, cfg.out) if cached else []
    if changed:  # fitted under other defaults (an older pixelrec)
        print(f"pixelrec {model} seed {seed}: the cached result was fitted with other settings "
              f"({'; '.join(changed)}): {'not used' if cached_only else 'fitting again'}", flush=True)
        cached = None
    if cached or cached_only:
        return cached
    t0 = time.time()
    res = fit(cfg, overwrite=True)
    t = res.test["overall"]
    row = {"side": "pixelrec", "model": model, "seed": seed, "ndcg@10": t["ndcg@10"], "recall@10": t["recall@10"],
           "best_epoch": res.best_epoch, "epochs": res.epochs_run, "seconds": round(time.time() - t0, 1),
           "s_per_epoch": round(res.seconds_per_epoch, 2), "capped": res.epochs_run >= cfg.train.epochs,
           "max_len": cfg.model.max_len, "dim": cfg.model.dim, "patience": cfg.train.patience, "key": key}
    _write_json(result_file, row)
    return row


def run_peer(model: str, seed: int, args, out: Path) -> dict:
    """Train RecBole's model in its venv on one seed (or reuse the cached result) -> its row."""
    from pixelrec.recommend.config import FitConfig

    cfg = FitConfig(interactions=args.csv, out=str(out / "peer-settings"))  # only read, never fitted
    cfg.model.model = model
    for item in args.overrides:
        _override(cfg, item)
    cmd = peer_command(args, model, seed, cfg.model.max_len, cfg.model.dim, cfg.train.patience)
    key = {"cmd": cmd[2:], "csv": _file_key(args.csv)}
    result_file = out / "results" / f"recbole-{model}-seed{seed}.json"
    cached = _cached(result_file, key, args.refit)
    if cached:
        return cached
    log = out / "results" / f"recbole-{model}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"RecBole {model} seed {seed}: {' '.join(cmd)} (log {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=out)
    if proc.returncode != 0:
        raise SystemExit(f"RecBole {model} seed {seed} failed (exit {proc.returncode}); see {log}")
    row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": round(time.time() - t0, 1), "key": key}
    _write_json(result_file, row)
    return row


def peer_command(args, model: str, seed: int, max_len: int, dim: int, patience: int) -> list[str]:
    cmd = [str(peer_python(args.peer_venv)), str(PEER_SCRIPT), str(Path(args.csv).resolve()), "--model", model,
           "--seed", str(seed), "--epochs", str(args.peer_epochs), "--max-len", str(max_len), "--dim", str(dim),
           "--patience", str(patience)]
    if args.peer_max_minutes:
        cmd += ["--max-seconds", str(round(args.peer_max_minutes * 60))]
    return cmd


def _file_key(path: str) -> list:
    st = os.stat(path)
    return [os.path.basename(path), st.st_size]


def _cached(path: Path, key: dict, refit: bool) -> dict | None:
    if refit or not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if row.get("key") == json.loads(json.dumps(key)) else None


def _write_json(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- table
HEADER = f"{'':<29}{'NDCG@10':>9}{'Recall@10':>11}{'best/run':>10}{'s/epoch':>9}"


def _row_line(side: str, model: str, r: dict) -> str:
    cap = " capped" if r.get("capped") else ""
    return (f"{side:<8} {model:<9} seed {r['seed']:<6}{r['ndcg@10']:>9.4f}{r['recall@10']:>11.4f}"
            f"{r['best_epoch']:>5}/{r['epochs']:<4}{r['s_per_epoch']:>9.2f}{cap}")


def summary(rows: list[dict]) -> dict | None:
    """Mean (and sd over seeds) of NDCG@10, Recall@10 and s/epoch of some rows; None for no rows."""
    if not rows:
        return None
    out = {}
    for m in ("ndcg@10", "recall@10", "s_per_epoch"):
        vals = [r[m] for r in rows]
        out[m], out[m + "_sd"] = float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    out["n"] = len(rows)
    return out


def _mean_line(side: str, model: str, s: dict) -> str:
    sd = f"   (sd {s['ndcg@10_sd']:.4f} / {s['recall@10_sd']:.4f})" if s["n"] > 1 else ""
    return f"{side:<8} {model:<9} mean {s['n']:<6}{s['ndcg@10']:>9.4f}{s['recall@10']:>11.4f}{'':>10}{s['s_per_epoch']:>9.2f}{sd}"


def table(ours: list[dict], peers: list[dict], models: list[str]) -> list[str]:
    """Lines of the side-by-side table: per model our seeds and mean, the peer's, and ours/peer ratios."""
    lines = [HEADER]
    for model in models:
        mine = [r for r in ours if r["model"] == model]
        theirs = [r for r in peers if r["model"] == model]
        lines += [_row_line("pixelrec", model, r) for r in mine]
        a = summary(mine)
        if a and a["n"] > 1:
            lines.append(_mean_line("pixelrec", model, a))
        lines += [_row_line("RecBole", model, r) for r in theirs]
        b = summary(theirs)
        if b and b["n"] > 1:
            lines.append(_mean_line("RecBole", model, b))
        if a and b:
            r = {m: a[m] / b[m] if b[m] else float("nan") for m in ("ndcg@10", "recall@10", "s_per_epoch")}
            below = [m for m in ("NDCG@10", "Recall@10") if a[m.lower()] < b[m.lower()]]
            verdict = f"mean below RecBole's on {' and '.join(below)}" if below else "mean meets RecBole's on both metrics"
            lines.append(f"  ours/RecBole: NDCG@10 {r['ndcg@10']:.3f}, Recall@10 {r['recall@10']:.3f}, "
                         f"s/epoch {r['s_per_epoch']:.3f}; {verdict}"
                         + (" (RecBole capped)" if any(x.get("capped") for x in theirs) else ""))
        elif model not in PEER_MODELS:
            lines.append(f"  (no RecBole counterpart of {model} is run)")
        elif not a:
            lines.append(f"  (no pixelrec result for {model} yet)")
    return lines


def published_table(ours: list[dict], models: list[str]) -> list[str]:
    """Our runs beside the RecBole figures published with the CSV (no peer run)."""
    lines = [HEADER]
    for model in models:
        mine = [r for r in ours if r["model"] == model]
        lines += [_row_line("pixelrec", model, r) for r in mine]
        a = summary(mine)
        if a and a["n"] > 1:
            lines.append(_mean_line("pixelrec", model, a))
        if a is None or model not in RECBOLE:
            continue
        for setting, n, rc in RECBOLE[model]:
            lines.append(f"  RecBole {model} {setting:<14}{n:>9.4f}{rc:>11.4f}   (published)")
        best_n = max(x[1] for x in RECBOLE[model])
        best_r = max(x[2] for x in RECBOLE[model])
        meets = sum(r["ndcg@10"] >= best_n and r["recall@10"] >= best_r for r in mine)
        lines.append(f"  mean / best RecBole: NDCG@10 {a['ndcg@10'] / best_n:.3f}, Recall@10 "
                     f"{a['recall@10'] / best_r:.3f}; {meets} of {len(mine)} runs meet both bars")
    return lines


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
