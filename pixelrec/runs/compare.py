"""`pixelrec compare RUN...`: one table across finished runs, from what each run already records.

Read-only, and no model is loaded: the settings come from config.json, the test metrics from the
published model's results.json (through the manifest, so a half-published fit is refused), and the
epochs and their times from metrics.jsonl. A directory that is no run, or a run without published
results, is skipped with the reason; `compare_runs` raises only when no run is left.

Columns: the run, its sequence model, item tower and image encoder; every other setting whose
value differs between the runs (named as its `fit` option, e.g. `lr`, or as its config key for
settings that are not options; `data` when the runs trained on different interactions); test
NDCG@10 and Recall@10 over all users, warm and cold targets; the best epoch, the epochs run, the
mean training seconds per epoch and the epochs' wall time (training and validation, summed). A
setting that one run does not read (null in its config.json) does not make a column by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PixelrecError
from ..recommend.config import fit_options
from ..runtime import atomic_path
from .rundir import RunDir

K = 10  # the cut-off shown (fit's results hold @5, @10 and @20; validation early-stops on NDCG@10)
METRICS = (f"ndcg@{K}", f"recall@{K}")
PARTS = ("overall", "warm", "cold")
METRIC_COLUMNS = tuple(f"{m}{'' if part == 'overall' else ' ' + part}" for part in PARTS for m in METRICS)
TIME_COLUMNS = ("best epoch", "epochs run", "s/epoch", "wall s")
FIXED = ("run", "model", "items", "encoder")
# Settings never listed as differing: shown in a fixed column, or where the run was written.
NOT_COMPARED = {"out", "model.model", "items.kind", "items.encoder"}
CURVE_METRIC = f"valid_ndcg@{K}"  # what `--plot` draws per epoch: the early-stopping metric
PLOT_FORMATS = ("png", "pdf", "svg")


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict[str, Any]]  # column -> value (None: not applicable, e.g. no cold users)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory, why)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run -> (epoch, valid NDCG@10)


@dataclass
class _Run:
    name: str
    settings: dict[str, Any]  # "section.field" (and "data") -> value
    row: dict[str, Any]
    curve: list[tuple[int, float]]


def compare_runs(run_dirs: list[str], sort: str | None = None) -> Comparison:
    """The table across `run_dirs` (order kept unless `sort` names a column: quality metrics best
    first, everything else ascending). PixelrecError when none of them is a finished run."""
    runs, skipped = [], []
    for run_dir in run_dirs:
        try:
            runs.append(_read_run(run_dir))
        except PixelrecError as exc:
            skipped.append((str(run_dir), _reason(str(exc), str(run_dir))))
    if not runs:
        raise PixelrecError(f"no run to compare: {'; '.join(f'{d}: {why}' for d, why in skipped) or 'none given'}")
    differing = _differing(runs)
    names = _column_names(differing)
    columns = [*FIXED, *names, *METRIC_COLUMNS, *TIME_COLUMNS]
    rows = [{**{c: r.row[c] for c in FIXED}, **{n: r.settings.get(k) for k, n in zip(differing, names)},
             **{c: r.row[c] for c in (*METRIC_COLUMNS, *TIME_COLUMNS)}} for r in runs]
    if sort is not None:
        rows = sort_rows(rows, columns, sort)
    return Comparison(columns, rows, skipped, {r.name: r.curve for r in runs})


def sort_rows(rows: list[dict[str, Any]], columns: list[str], key: str) -> list[dict[str, Any]]:
    """Rows by column `key`: quality metrics best first, other columns ascending; missing values last."""
    if key not in columns:
        raise PixelrecError(f"--sort {key!r}: not a column of this table; choose one of {', '.join(columns)}")
    best_first = key in METRIC_COLUMNS
    present = [r for r in rows if r[key] is not None]
    missing = [r for r in rows if r[key] is None]
    try:
        present.sort(key=lambda r: r[key], reverse=best_first)
    except TypeError:  # mixed kinds (a setting set in one run, another type in another): compare as text
        present.sort(key=lambda r: str(r[key]), reverse=best_first)
    return present + missing


def _reason(message: str, run_dir: str) -> str:
    """The error's message without the directory it starts with (the skip line names it already)."""
    return message[len(run_dir) + 2:] if message.startswith(f"{run_dir}: ") else message


def _read_run(run_dir: str) -> _Run:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise PixelrecError("no such directory" if not run.path.exists() else "a file, not a run directory")
    meta = run.read_config()
    cfg = run.fit_config(meta)
    results = run.read_results()
    try:
        history = run.read_metrics()
    except (ValueError, UnicodeDecodeError) as exc:
        raise PixelrecError(f"{run.metrics}: unreadable ({type(exc).__name__}); the run directory is damaged") from None
    published = run.published()
    settings = _flatten(cfg.record())
    settings["data"] = str(meta["data"]["fingerprint"])[:12]
    name = str(run_dir)
    row: dict[str, Any] = {"run": name, "model": cfg.model.model, "items": _tower(cfg.items.kind, cfg.items.image_branch),
                           "encoder": _encoder(cfg, meta.get("cache"))}
    for part in PARTS:
        scores = results.get(part) or {}
        for metric in METRICS:
            value = scores.get(metric)
            row[f"{metric}{'' if part == 'overall' else ' ' + part}"] = float(value) if value is not None else None
    train = [float(h["train_seconds"]) for h in history if "train_seconds" in h]
    wall = [float(h["seconds"]) for h in history if "seconds" in h]
    row.update({"best epoch": published.best_epoch, "epochs run": len(history),
                "s/epoch": round(sum(train) / len(train), 4) if train else None,
                "wall s": round(sum(wall), 3) if wall else None})
    curve = [(int(h["epoch"]), float(h[CURVE_METRIC])) for h in history if CURVE_METRIC in h and "epoch" in h]
    return _Run(name, settings, row, curve)


def _tower(kind: str, branch: str) -> str:
    return f"hybrid/{branch}" if kind == "hybrid" else kind


def _encoder(cfg, cache: dict[str, Any] | None) -> str | None:
    """The image encoder: e2e runs name it; cache towers read the cache's; id towers have none."""
    items = cfg.items
    branch = items.image_branch if items.kind == "hybrid" else items.kind
    if items.kind == "id":
        return None
    if branch == "e2e":
        return items.encoder
    model = (cache or {}).get("model")
    return str(model) if model is not None else None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _differing(runs: list[_Run]) -> list[str]:
    """Setting keys with two or more values among the runs, in config order. A null (a setting the
    run's tower or model does not read) is no value: sasrec's heads do not differ from gru4rec's."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.settings if k not in keys]
    return [k for k in keys if k not in NOT_COMPARED
            and len({repr(r.settings.get(k)) for r in runs if r.settings.get(k) is not None}) > 1]


def _column_names(keys: list[str]) -> list[str]:
    """A setting's column: its `fit` option without dashes (`lr`, `item-dropout`), else its key."""
    flags = {opt.key: opt.flag.lstrip("-") for opt in fit_options()}
    return [flags.get(k, k) for k in keys]


# ------------------------------------------------------------------------------------ plot
def plot_curves(comparison: Comparison, path: str) -> None:
    """Validation NDCG@10 per epoch of every compared run, one line each (PNG, PDF or SVG by suffix)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise PixelrecError(f"--plot {path}: unknown image format {fmt or '(no extension)'!r}; "
                            f"end the name in .{', .'.join(PLOT_FORMATS)}")
    import matplotlib  # deferred: only the plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in comparison.rows:
        curve = comparison.curves.get(row["run"], [])
        if curve:
            line, = ax.plot([e for e, _ in curve], [v for _, v in curve], marker="o", markersize=3, label=row["run"])
            best = [v for e, v in curve if e == row["best epoch"]]
            if best:  # the published model's epoch
                ax.plot([row["best epoch"]], best, marker="*", markersize=12, color=line.get_color())
    ax.set(xlabel="epoch (star: the published model's)", ylabel=f"valid NDCG@{K}",
           title=f"Validation NDCG@{K} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=110)
    finally:
        plt.close(fig)
