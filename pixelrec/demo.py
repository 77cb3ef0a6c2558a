"""`pixelrec demo`: the whole system on a small synthetic catalogue, in a few minutes on a CPU.

synthesise covers + interactions -> encode once with a tiny random-init ViT (pooled embeddings and
split-block tokens) -> fit SASRec with the id, frozen, partial, e2e and hybrid item towers -> evaluate
the test split (overall, warm and cold items) -> print one comparison table, plot the training
curves, recall by popularity bucket and the warm/cold trade-off, and retrieve for one user.
Everything goes through the public API; the same steps are `pixelrec synth / encode / fit / evaluate / retrieve` on the command line.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data.synth import SynthConfig, synthesize
from .encode import EncodeConfig, EncoderConfig, encode_images
from .recommend.config import FitConfig, ItemsConfig
from .runs.fit import fit
from .runs.retrieve import retrieve_one
from .runs.rundir import RunDir
from .runtime import log


@dataclass
class DemoConfig:
    workdir: str = "pixelrec-demo"
    users: int = 2000
    items: int = 400
    cold_items: int = 40
    styles: int = 8
    image_size: int = 32
    encoder: str = "pixelrec-tiny-vit"
    split_block: int = 2
    towers: tuple[str, ...] = ("id", "frozen", "partial", "e2e", "hybrid")
    epochs: int = 30
    patience: int = 5
    lr: float = 2e-3
    dim: int = 32
    max_len: int = 20
    seed: int = 0
    device: str = "auto"
    overwrite: bool = True
    # hybrid: also fit it at these ID-dropout rates (besides its default) to draw the warm/cold
    # frontier; () = the default hybrid alone. Not 0: without ID dropout the hybrid's validation
    # NDCG@10 peaks within two or three epochs here, so early stopping keeps a model whose id part is
    # barely trained and whose items rank by image (warm 0.58x id's, cold 1.8x the image towers'):
    # a stopping artefact that reads like a cold-start recipe.
    hybrid_sweep: tuple[float, ...] = (0.25, 0.5)


@dataclass
class DemoResult:
    rows: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)  # the hybrid at each --id-dropout of DemoConfig.hybrid_sweep
    table: str = ""
    plot: str = ""
    retrieval: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_demo(cfg: DemoConfig) -> DemoResult:
    t0 = time.time()
    work = Path(cfg.workdir)
    side = "side" in cfg.towers  # the side tower reads per-layer states: a cache with them (another file)
    data_dir, cache = work / "data", work / ("cache_hidden.h5" if side else "cache.h5")
    log(f"[1/4] synthesising {cfg.users} users x {cfg.items} items ({cfg.cold_items} cold) in {data_dir}")
    if (data_dir / "synth.json").is_file() and json.loads((data_dir / "synth.json").read_text()).get("complete"):
        log(f"      {data_dir} exists; reusing it")
    else:
        synthesize(data_dir, SynthConfig(users=cfg.users, items=cfg.items, cold_items=cfg.cold_items,
                                         styles=cfg.styles, image_size=cfg.image_size, seed=cfg.seed))
    interactions = str(data_dir / "interactions.csv")

    log(f"[2/4] encoding covers once with {cfg.encoder} (random init) -> {cache}")
    encode_images(EncodeConfig(images=str(data_dir / "covers"), out=str(cache), interactions=interactions,
                               encoder=EncoderConfig(model=cfg.encoder, seed=cfg.seed),
                               split_block=cfg.split_block, device=cfg.device, num_workers=0,
                               hidden="cls" if side else None))

    result = DemoResult()
    default_p = ItemsConfig().id_dropout
    fits = [(kind, work / f"run_{kind}", {}) for kind in cfg.towers]
    if "hybrid" in cfg.towers:
        fits += [("hybrid", work / f"run_hybrid_p{p:g}", {"id_dropout": p})
                 for p in sorted(set(cfg.hybrid_sweep) - {default_p})]
    clock = FitClock(fits)
    for number, (kind, out, items) in enumerate(fits, 1):
        what = f"at --id-dropout {items['id_dropout']:g} (warm/cold frontier)" if items else "item tower"
        log(f"[3/4] fit {number} of {len(fits)}: SASRec with the {kind} {what}; {clock.remaining(number - 1)}")
        started = time.time()
        row = _fit_row(cfg, kind, out, data_dir, cache, **items)
        clock.done(number - 1, time.time() - started, row["epochs_run"])
        if items:
            result.sweep.append({**row, **items})
        else:
            result.rows.append(row)
    if "hybrid" in cfg.towers:
        hybrid = next(r for r in result.rows if r["tower"] == "hybrid")
        result.sweep.append({**hybrid, "id_dropout": default_p})
        result.sweep.sort(key=lambda r: r["id_dropout"])

    log("[4/4] comparing")
    result.table = format_table(result.rows, cfg, result.sweep)
    result.plot = str(work / "demo.png")
    plot_runs(result.rows, result.plot, result.sweep)
    best_image = next((r for r in result.rows if r["tower"] in ("partial", "frozen", "e2e")), result.rows[-1])
    user = str(RunDir(best_image["run_dir"]).read_data().user_ids[0])
    result.retrieval = {**retrieve_one(best_image["run_dir"], user=user, k=5).to_dict(), "run_dir": best_image["run_dir"]}
    result.seconds = time.time() - t0
    return result


# Relative cost of one fit per item tower on the demo's catalogue (s/epoch measured by the demo on a
# 2-core CPU: id 0.41, frozen 0.41, hybrid 0.99, partial 1.78, e2e 3.29), to weigh the time estimate.
FIT_COST = {"id": 1.0, "frozen": 1.0, "hybrid": 2.4, "partial": 4.3, "e2e": 8.0}


class FitClock:
    """Estimates the demo's remaining fit time from the fits done so far: their seconds per epoch,
    weighed by FIT_COST, and how many epochs they ran before early stopping."""

    def __init__(self, fits: list[tuple]):
        self.weights = [FIT_COST.get(kind, 1.0) for kind, *_ in fits]
        self.seconds = 0.0
        self.weighted_epochs = 0.0  # sum over done fits of FIT_COST x epochs run
        self.epochs: list[int] = []

    def done(self, position: int, seconds: float, epochs: int) -> None:
        self.seconds += seconds
        self.weighted_epochs += self.weights[position] * max(1, epochs)
        self.epochs.append(max(1, epochs))

    def remaining(self, done: int) -> str:
        """'about N min left (estimate)' for the fits from position `done` on."""
        if not self.epochs:
            return "time left estimated after the first fit"
        per_epoch = self.seconds / self.weighted_epochs  # seconds per epoch of a weight-1 tower
        epochs = sum(self.epochs) / len(self.epochs)  # what a fit ran so far, on average
        left = per_epoch * epochs * sum(self.weights[done:])
        return f"about {left / 60:.0f} min left (estimate)" if left >= 90 else f"about {left:.0f} s left (estimate)"


def _fit_row(cfg: DemoConfig, kind: str, out: Path, data_dir: Path, cache: Path, **items) -> dict:
    """Fit SASRec with one item tower (ItemsConfig fields `items` changed from their defaults) -> its table row."""
    fc = FitConfig(interactions=str(data_dir / "interactions.csv"), out=str(out))
    fc.items.kind = kind
    fc.items.cache = str(cache) if fc.items.uses_cache else None
    if kind == "e2e":
        fc.items.images, fc.items.encoder, fc.items.tune_blocks = str(data_dir / "covers"), cfg.encoder, cfg.split_block
    for name, value in items.items():
        setattr(fc.items, name, value)
    fc.model.dim, fc.model.max_len = cfg.dim, cfg.max_len
    fc.train.epochs, fc.train.patience, fc.train.seed, fc.train.device = cfg.epochs, cfg.patience, cfg.seed, cfg.device
    fc.train.lr = cfg.lr
    res = fit(fc, overwrite=cfg.overwrite)
    test = res.test
    return {
        "tower": kind, "recall@10": test["overall"]["recall@10"], "ndcg@10": test["overall"]["ndcg@10"],
        "warm_recall@10": test["warm"]["recall@10"], "warm_ndcg@10": test["warm"]["ndcg@10"],
        "cold_recall@10": test["cold"]["recall@10"], "cold_ndcg@10": test["cold"]["ndcg@10"],
        "cold_users": test["cold"]["users"], "s_per_epoch": res.seconds_per_epoch, "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "run_dir": str(res.run_dir), "buckets": test["buckets"],
    }


def format_table(rows: list[dict], cfg: DemoConfig, sweep: list[dict] = ()) -> str:
    chance = 10 / max(cfg.items, 1)
    lines = [f"{'tower':<9}{'Recall@10':>11}{'NDCG@10':>10}{'warm N@10':>11}{'cold R@10':>11}{'cold N@10':>11}"
             f"{'s/epoch':>9}{'best ep':>9}", "-" * 81]
    for r in rows:
        lines.append(f"{r['tower']:<9}{r['recall@10']:>11.4f}{r['ndcg@10']:>10.4f}{_f(r.get('warm_ndcg@10')):>11}"
                     f"{_f(r['cold_recall@10']):>11}{_f(r['cold_ndcg@10']):>11}{r['s_per_epoch']:>9.2f}{r['best_epoch']:>9}")
    lines.append(f"cold = {rows[0]['cold_users'] if rows else 0} test users whose target item never appears in "
                 f"training; chance Recall@10 over the whole catalogue = {chance:.3f}")
    lines += tradeoff_lines(rows, sweep)
    return "\n".join(lines)


IMAGE_ONLY = ("frozen", "partial", "e2e", "side")


def tradeoff_lines(rows: list[dict], sweep: list[dict] = ()) -> list[str]:
    """The hybrid against the cold-start bars (warm NDCG@10 / id's >= 0.98, cold Recall@10 / the best
    image-only tower's >= 0.9), for the default hybrid and, one labelled row each, every ID-dropout
    rate of the sweep, with the sampling noise of the cold ratio."""
    by = {r["tower"]: r for r in rows}
    images = [by[k]["cold_recall@10"] or 0.0 for k in IMAGE_ONLY if k in by]
    if "hybrid" not in by or "id" not in by or not images or not by["id"].get("warm_ndcg@10"):
        return []
    id_warm, best_cold = by["id"]["warm_ndcg@10"], max(max(images), 1e-12)

    def warm(r: dict) -> float:
        return (r["warm_ndcg@10"] or 0.0) / id_warm

    def cold(r: dict) -> float:
        return (r["cold_recall@10"] or 0.0) / best_cold

    lines = [f"hybrid: warm NDCG@10 {warm(by['hybrid']):.3f} x id's, cold Recall@10 {cold(by['hybrid']):.3f} "
             f"x the best image-only tower's (bars: 0.98, 0.9)"]
    if len(sweep) > 1:
        lines.append("hybrid by --id-dropout p (warm = warm NDCG@10 / id's, cold = cold Recall@10 / the best "
                     "image-only tower's):")
        lines.append(f"  {'p':<6}{'warm':>7}{'cold':>7}{'best ep':>9}")
        for r in sweep:
            p = r["id_dropout"]
            note = DROPOUT_NOTES.get(p) or ("the default: the hybrid row above" if p == ItemsConfig().id_dropout else "")
            lines.append(f"  {p:<6g}{warm(r):>7.3f}{cold(r):>7.3f}{r.get('best_epoch', '-'):>9}  {note}".rstrip())
        users = by["id"].get("cold_users") or 0
        if users and 0 < best_cold < 1:
            noise = 2 * math.sqrt(best_cold * (1 - best_cold) / users) / best_cold
            lines.append(f"  cold ratios within about +-{noise:.2f} of each other are sampling noise "
                         f"({users} cold test users)")
    return lines


DROPOUT_NOTES = {0.0: "no ID dropout: an early best epoch leaves the id part under-trained and items ranked "
                      "by image; not a cold-start recipe"}


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def plot_runs(rows: list[dict], path: str, sweep: list[dict] = ()) -> None:
    import matplotlib  # deferred: only the plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for r in rows:
        hist = RunDir(r["run_dir"]).read_metrics()
        # e2e computes the same function as partial, so their curves coincide: draw e2e dashed
        # with small markers so partial stays visible underneath
        style = dict(marker="x", linestyle="--", markersize=5) if r["tower"] == "e2e" else dict(marker="o")
        ax1.plot([h["epoch"] for h in hist], [h["valid_ndcg@10"] for h in hist], label=r["tower"], **style)
    ax1.set(xlabel="epoch", ylabel="valid NDCG@10", title="Validation NDCG@10 per epoch")
    ax1.legend()
    labels = [b for b in rows[0]["buckets"] if rows[0]["buckets"][b]["users"]] if rows else []
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        vals = [r["buckets"][b]["recall@10"] or 0.0 for b in labels]
        ax2.bar([j + i * width for j in range(len(labels))], vals, width=width, label=r["tower"])
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax2.set(xlabel="target's training interactions", ylabel="test Recall@10", title="Recall@10 by item popularity")
    ax2.legend()
    plot_tradeoff(ax3, rows, sweep)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(ax, rows: list[dict], sweep: list[dict] = ()) -> None:
    """Warm NDCG@10 against cold Recall@10 per tower, with the cold-start bars (0.98 x id's warm
    NDCG@10, 0.9 x the best image-only tower's cold Recall@10; a tower meeting both sits in the top
    right corner they cut) and the hybrid's frontier across ID-dropout rates."""
    for r in rows:
        if r.get("warm_ndcg@10") is None:
            continue
        marker = "*" if r["tower"] == "hybrid" else "o"
        ax.scatter(r["warm_ndcg@10"], r["cold_recall@10"] or 0.0, marker=marker, s=160 if marker == "*" else 50,
                   label=r["tower"], zorder=3)
    if len(sweep) > 1:
        xs = [r["warm_ndcg@10"] or 0.0 for r in sweep]
        ys = [r["cold_recall@10"] or 0.0 for r in sweep]
        ax.plot(xs, ys, color="grey", linewidth=1, zorder=2, label="hybrid by --id-dropout")
        for r, x, y in zip(sweep, xs, ys):
            ax.annotate(f"p={r['id_dropout']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    by = {r["tower"]: r for r in rows}
    if by.get("id", {}).get("warm_ndcg@10"):
        ax.axvline(0.98 * by["id"]["warm_ndcg@10"], color="grey", linestyle=":", linewidth=1)
    images = [by[k]["cold_recall@10"] or 0.0 for k in IMAGE_ONLY if k in by]
    if images:
        ax.axhline(0.9 * max(images), color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="warm test NDCG@10", ylabel="cold test Recall@10",
           title="Warm / cold trade-off (dotted: the bars)")
    ax.legend(fontsize=7)
