"""Cold start on real behaviour: MovieLens-100K with a seeded share of items made cold, a cover per
item rendered from its metadata, and the id / image / hybrid item towers compared on warm and cold
test targets.

    python benchmarks/coldstart.py PATH/ml100k.csv PATH/ml100k_items.csv [--seeds 0,1,2] [--out runs/coldstart]
        [--recipes id,frozen,partial,hybrid-plain,hybrid-dropout,hybrid-gate,hybrid-map,hybrid]
        [--recipe NAME:section.field=value,...] [--set section.field=value] [--plot coldstart.png]
    python benchmarks/coldstart.py PATH/ml100k.csv PATH/ml100k_items.csv --models all [--recipes id,frozen,hybrid]
        [--epochs N] [--model-epochs lightsans=N,srgnn=N]

The data is not shipped with pixelrec (GroupLens terms): pass its paths. Everything is written
under --out (default runs/coldstart): covers, the encoded cache, one interaction file per seed,
the runs, and one result file per (recipe, seed), which a rerun reuses (so several processes can
share the work: give them different --recipes/--seeds and the same --out, then run once more with
everything to print the table).

Cold split (per seed s: items and training both seeded by s). The interactions are ordered per user
by timestamp (stable: ties keep file order), as `pixelrec fit` orders them. A share (--cold-share,
20%) of the catalogue, drawn uniformly with seed s, is made cold: every interaction with a cold item
is removed EXCEPT when it is the user's final interaction. Removing earlier rows never changes which
row is final, so a user whose final item is cold keeps it as their test target (leave-one-out: last =
test, second last = valid, the rest train) and every other user loses only history. A cold item
therefore never appears in training or validation: it exists only as a test target, exactly as a
new item that users discover after the model was trained. Uniform draws keep the cold items as
popular as the warm ones on average, so about a fifth of the test users have a cold target.
"Cold" in the table is what `pixelrec evaluate` reports: test targets with no training
interaction (the cold items, plus the few warm items whose only interactions were final or
validation ones); "warm" is every other test target.

Covers (`render_cover`, 32 x 32 px, what a real poster shows of its metadata): the top band is the
decade (its colour, and a marker whose position is the decade); the middle is one horizontal band
per genre (up to three, in a fixed order), each in its genre's colour and texture; the bottom strip
carries the title in an 8 px font. Covers are encoded once by the tiny random-init ViT
(`pixelrec-tiny-vit`, 32 px, patch 8, 4 blocks; split block 2 for `partial`).

Recipes (`RECIPES`, each a set of FitConfig overrides on pixelrec's defaults): id, frozen, partial,
the plain hybrid (all cold-start recipes off), each hybrid recipe alone and combined, and `hybrid`
with pixelrec's defaults (the winner); `side`, `side-even`, `side-mean` (`--hidden cls+mean`) and
`side-hybrid` (ID + side) fit `--items side` on a cache encoded with every layer's states. Diagnosis recipes (`--diagnose`) replace the ViT features
with controlled ones to find why the frozen tower falls behind id on warm items.

`--models sasrec,gru4rec,...|all` fits every recipe (default: id, frozen, hybrid) with each sequence
model of the registry (`--model`, at that model's own defaults), caches one result file per (model,
recipe, seed) under results/<model>/, and prints the PixelRec-shaped table: models across, towers
down, overall NDCG@10, warm NDCG@10 and cold Recall@10 per tower.

Otherwise prints one markdown table: overall, warm and cold Recall@10 / NDCG@10 and s/epoch, mean and sd
over seeds, and the targets: the default hybrid's warm NDCG@10 / id's (>= 0.98) and its cold
Recall@10 / the best image-only tower's (>= 0.9). --plot draws warm NDCG@10 against cold Recall@10
for every recipe (the warm/cold trade-off).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_settings import changed_settings  # noqa: E402

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
DECADES = tuple(range(1920, 2000, 10))  # 1922..1998 in ML-100K; unknown years get their own colour
COVER_SIZE = 32
ENCODER = "pixelrec-tiny-vit"
SPLIT_BLOCK = 2

HYBRID_OFF = {"items.kind": "hybrid", "items.id_dropout": 0.0, "items.hybrid_gate": "none", "items.image_to_id": 0.0}
# name -> FitConfig overrides ("section.field" -> value) on pixelrec's defaults
RECIPES: dict[str, dict] = {
    "id": {"items.kind": "id"},
    "frozen": {"items.kind": "frozen"},
    "partial": {"items.kind": "partial"},
    "hybrid-plain": dict(HYBRID_OFF),
    "hybrid-dropout": {**HYBRID_OFF, "items.id_dropout": 0.5},
    "hybrid-gate": {**HYBRID_OFF, "items.hybrid_gate": "count"},
    "hybrid-map": {**HYBRID_OFF, "items.image_to_id": 1.0},
    "hybrid-dropout-gate": {**HYBRID_OFF, "items.id_dropout": 0.5, "items.hybrid_gate": "count"},
    "hybrid-dropout-map": {**HYBRID_OFF, "items.id_dropout": 0.5, "items.image_to_id": 1.0},
    "hybrid-all": {**HYBRID_OFF, "items.id_dropout": 0.5, "items.hybrid_gate": "count", "items.image_to_id": 1.0},
    "hybrid": {"items.kind": "hybrid"},  # pixelrec's default hybrid recipe (= gate + map + ID dropout 0.3)
}
# The default recipe (count gate + image -> id map) at other ID-dropout rates than its 0.3: with
# `hybrid`, the warm/cold frontier (--frontier hybrid-p0,hybrid-p0.1,hybrid,hybrid-p0.5).
SWEEP = {f"hybrid-p{p:g}": {"items.kind": "hybrid", "items.hybrid_gate": "count", "items.image_to_id": 1.0,
                            "items.id_dropout": p} for p in (0.0, 0.1, 0.5)}
RECIPES.update(SWEEP)
# `--items side`: a side network over the cached per-layer states (`cache=hidden`: the covers encoded
# with `--hidden cls`, every tap; `hidden-mean`: `--hidden cls+mean`); side-hybrid = ID + side.
SIDE = {"side": {"items.kind": "side", "cache": "hidden"},
        "side-even": {"items.kind": "side", "items.side_taps": "even", "cache": "hidden"},
        "side-mean": {"items.kind": "side", "cache": "hidden-mean"},
        "side-hybrid": {"items.kind": "hybrid", "items.image_branch": "side", "cache": "hidden"}}
RECIPES.update(SIDE)
HIDDEN_CACHES = {"hidden": "cls", "hidden-mean": "cls+mean"}  # cache kind -> `encode --hidden`
FRONTIER = ("hybrid-p0", "hybrid-p0.1", "hybrid", "hybrid-p0.5")
DEFAULT_RECIPES = ("id", "frozen", "partial", "hybrid-plain", "hybrid-dropout", "hybrid-gate", "hybrid-map", "hybrid")
IMAGE_ONLY = ("frozen", "partial")
# Item 5 of the cold-start issue: why does `frozen` lose half of id's warm NDCG here? Each recipe
# changes one thing: the features (`cache`: vit = the random-init ViT's pooled 32-d output, vit-mean =
# its 64-d mean of tokens, meta = the exact metadata as a multi-hot vector, random = a random unique
# 64-d vector per item (identity, no content), meta+random = both), the adapter, its lr, item dropout.
DIAGNOSIS: dict[str, dict] = {
    "frozen-linear": {"items.kind": "frozen", "items.adapter": "linear"},
    "frozen-lr3e-3": {"items.kind": "frozen", "train.lr": 3e-3},
    "frozen-lr3e-4": {"items.kind": "frozen", "train.lr": 3e-4},
    "frozen-dropout0.2": {"items.kind": "frozen", "items.dropout": 0.2},
    "frozen-vit-mean": {"items.kind": "frozen", "cache": "vit-mean"},
    "frozen-meta": {"items.kind": "frozen", "cache": "meta"},
    "frozen-random": {"items.kind": "frozen", "cache": "random"},
    "frozen-meta+random": {"items.kind": "frozen", "cache": "meta+random"},
}


# ------------------------------------------------------------------------------------------ data
def load_interactions(path: str):
    """ML-100K rows ordered as `pixelrec fit` orders them: per user, by timestamp, ties in file order."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"item_id": str, "user_id": str})
    df["row"] = np.arange(len(df))
    return df.sort_values(["user_id", "timestamp", "row"], kind="stable").reset_index(drop=True)


def cold_split(df, items: list[str], share: float, seed: int):
    """(interactions with the cold items kept only as users' final item, sorted list of cold items)."""
    rng = np.random.default_rng(seed)
    cold = sorted(rng.choice(np.array(sorted(items)), size=int(round(share * len(items))), replace=False).tolist())
    is_last = ~df.user_id.duplicated(keep="last")  # rows are in each user's time order
    keep = ~df.item_id.isin(set(cold)) | is_last
    return df[keep], cold


def write_split(df, items: list[str], share: float, seed: int, out: Path) -> Path:
    path = out / "data" / f"seed{seed}" / "interactions.csv"
    if path.is_file():
        return path
    kept, cold = cold_split(df, items, share, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    kept[["item_id", "user_id", "timestamp"]].to_csv(tmp, index=False)
    (path.parent / "cold_items.txt").write_text("".join(f"{i}\n" for i in cold))
    os.replace(tmp, path)
    return path


def split_summary(path: Path) -> dict:
    from pixelrec.data.sequences import load_sequences

    data = load_sequences(str(path))
    counts = data.train_counts
    targets = data.targets("test")
    return {"users": data.num_users, "items": data.num_items, "interactions": data.num_interactions,
            "cold_items": int((counts[1:] == 0).sum()), "cold_test_users": int((counts[targets] == 0).sum())}


# ---------------------------------------------------------------------------------------- covers
def _genre_colour(g: int) -> tuple[int, int, int]:
    import colorsys

    hue = (g * 7 % len(GENRES)) / len(GENRES)  # neighbours in the list get distant hues
    r, gg, b = colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * (g % 2), 0.95 - 0.35 * (g % 3 == 2))
    return int(255 * r), int(255 * gg), int(255 * b)


def _texture(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A [H, W] mask in {0, 1}: solid, stripes (3 orientations), checker or dots."""
    return [np.ones_like(x), (y // 2) % 2, (x // 2) % 2, ((x + y) // 3) % 2, ((x // 4) + (y // 4)) % 2,
            ((x % 4 < 2) & (y % 4 < 2)).astype(x.dtype)][kind % 6]


def render_cover(title: str, year: str, genres: list[str], size: int = COVER_SIZE):
    """A poster-like cover of an item's metadata (see the module doc): decade band, genre bands, title."""
    from PIL import Image, ImageDraw, ImageFont

    img = np.zeros((size, size, 3), dtype=np.float32)
    top, bottom = size // 8, size - size // 4  # decade band rows [0, top), genres [top, bottom), title below
    decade = int(year) // 10 * 10 if str(year).isdigit() else None
    if decade is None:
        img[:top] = (90, 90, 90)
    else:
        d = min(max((decade - DECADES[0]) // 10, 0), len(DECADES) - 1)
        t = d / (len(DECADES) - 1)  # old films sepia, recent ones blue
        img[:top] = (200 - 150 * t, 150 - 20 * t, 80 + 160 * t)
        x0 = d * size // len(DECADES)
        img[:top, x0 : x0 + size // len(DECADES)] = 255
    known = sorted({GENRES.index(g) for g in genres if g in GENRES}) or [0]
    shown = known[:3]
    edges = np.linspace(top, bottom, len(shown) + 1).round().astype(int)
    yy, xx = np.mgrid[0:size, 0:size]
    for g, y0, y1 in zip(shown, edges[:-1], edges[1:]):
        colour = np.array(_genre_colour(g), dtype=np.float32)
        mask = _texture(g, xx[y0:y1], yy[y0:y1])[..., None]
        img[y0:y1] = colour * (0.55 + 0.45 * mask)
    img[bottom:] = 15
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    draw.text((1, bottom), title, fill=(240, 240, 240), font=ImageFont.load_default(size=max(6, size // 4)))
    return pil


def write_covers(items_csv: str, out: Path) -> tuple[Path, "object"]:
    """covers/<item_id>.png for every item of the metadata file; returns (directory, metadata frame)."""
    import pandas as pd

    meta = pd.read_csv(items_csv, dtype={"item_id": str, "title": str, "year": str, "genres": str},
                       keep_default_na=False)
    covers = out / "covers"
    done = covers / ".complete"
    if not done.is_file():
        covers.mkdir(parents=True, exist_ok=True)
        for row in meta.itertuples():
            render_cover(row.title, row.year, row.genres.split("|")).save(covers / f"{row.item_id}.png")
        done.write_text(f"{len(meta)}\n")
    return covers, meta


def encode_covers(covers: Path, out: Path, pooling: str = "model", hidden: str | None = None) -> Path:
    """The covers' cache (`hidden`: with every layer's states, `encode --hidden`), encoded once."""
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images

    cache = out / ("cache.h5" if pooling == "model" else f"cache_{pooling}.h5")
    if hidden:
        cache = cache.with_name(f"{cache.stem}_hidden-{hidden.replace('+', '-')}.h5")
    if not cache.is_file():
        encode_images(EncodeConfig(images=str(covers), out=str(cache), encoder=EncoderConfig(model=ENCODER, pooling=pooling),
                                   split_block=SPLIT_BLOCK, device="cpu", num_workers=0, hidden=hidden))
    return cache


def feature_cache(kind: str, meta, out: Path) -> Path:
    """A cache of controlled features instead of the encoder's (diagnosis): `meta` (genres multi-hot,
    decade one-hot), `random` (a unique N(0, 1) 64-d vector per item), or `meta+random`."""
    from pixelrec.encode.cache import CacheWriter

    path = out / f"cache_{kind}.h5"
    if path.is_file():
        return path
    ids = meta.item_id.tolist()
    parts = []
    if "meta" in kind:
        x = np.zeros((len(meta), len(GENRES) + len(DECADES) + 1), dtype=np.float32)
        for i, row in enumerate(meta.itertuples()):
            for g in row.genres.split("|"):
                if g in GENRES:
                    x[i, GENRES.index(g)] = 1
            d = (int(row.year) // 10 * 10 - DECADES[0]) // 10 if row.year.isdigit() else len(DECADES)
            x[i, len(GENRES) + min(max(d, 0), len(DECADES))] = 1
        parts.append(x)
    if "random" in kind:
        parts.append(np.random.default_rng(12345).standard_normal((len(meta), 64)).astype(np.float32))
    x = np.concatenate(parts, axis=1)
    attrs = dict(model=f"features:{kind}", pretrained="none", pooling=kind, preset="none", seed=0, image_size=0,
                 dim=x.shape[1], split_block=0, embedding_dtype="float32", normalized=False,
                 weights_sha256=hashlib.sha256(x.tobytes()).hexdigest(),
                 items_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(), n_catalogue=len(ids))
    writer = CacheWriter.create(path, attrs, x.shape[1], np.dtype(np.float32))
    writer.append(ids, x, None, [], positions_done=len(ids))
    writer.finish()
    return path


# ------------------------------------------------------------------------------------------ runs
def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_recipe(spec: str) -> tuple[str, dict]:
    """'NAME:section.field=value,section.field=value' -> (NAME, overrides)."""
    name, _, body = spec.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = parse_value(value.strip())
    if not name or not overrides:
        raise SystemExit(f"--recipe {spec!r}: expected NAME:section.field=value[,...]")
    return name, overrides


def run_recipe(name: str, overrides: dict, seed: int, interactions: Path, caches: dict, out: Path,
               args) -> dict | None:
    """Fit one recipe on one seed's split (or reuse its result file) -> its result row (None: not fitted
    yet and --report-only)."""
    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    overrides = {**overrides, **args.overrides}
    result_file = out / "results" / f"{name}-seed{seed}.json"  # name is RECIPE or MODEL/RECIPE (--models)
    cfg = FitConfig(interactions=str(interactions), out=str(out / "runs" / f"{name}-seed{seed}"))
    cache_kind = "vit"
    for key, value in overrides.items():
        if key == "cache":
            cache_kind = value
        else:
            cfg.set(key, value)
    cfg.items.cache = str(caches[cache_kind]) if cfg.items.uses_cache else None
    cfg.train.seed, cfg.train.device = seed, args.device
    if epochs_cap(overrides, args):
        cfg.train.epochs = epochs_cap(overrides, args)
    if result_file.is_file() and not args.refit:
        row = json.loads(result_file.read_text())
        if row.get("overrides") == _jsonable(overrides) and row.get("epochs_cap", 0) == epochs_cap(overrides, args):
            changed = changed_settings(cfg, cfg.out)
            if not changed:
                return row
            print(f"  {name} seed {seed}: the cached result was fitted with other settings ({'; '.join(changed)}): "
                  f"{'not used' if args.report_only else 'fitting again'}", flush=True)
    if args.report_only:
        return None
    t0 = time.time()
    res = fit(cfg, overwrite=True)
    test = res.test
    row = {"recipe": name, "model": cfg.model.model, "seed": seed, "overrides": _jsonable(overrides),
           "epochs_cap": epochs_cap(overrides, args),
           **{f"{part}_{m}": test[part][m] for part in ("overall", "warm", "cold") for m in ("recall@10", "ndcg@10")},
           "cold_users": test["cold"]["users"], "warm_users": test["warm"]["users"],
           "s_per_epoch": res.seconds_per_epoch, "best_epoch": res.best_epoch, "epochs": res.epochs_run,
           "wall_s": round(time.time() - t0, 1)}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, result_file)
    return row


def epochs_cap(overrides: dict, args) -> int:
    """The cap on epochs of a fit: --model-epochs for its model, else --epochs (0 = none)."""
    return args.model_epochs.get(overrides.get("model.model"), args.epochs)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True))


# ---------------------------------------------------------------------------------------- report
METRICS = [("overall", "recall@10"), ("overall", "ndcg@10"), ("warm", "recall@10"), ("warm", "ndcg@10"),
           ("cold", "recall@10"), ("cold", "ndcg@10")]


def summarize(rows: list[dict], names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        mine = [r for r in rows if r["recipe"] == name]
        if not mine:
            continue
        stats = {"seeds": len(mine)}
        for key in [f"{p}_{m}" for p, m in METRICS] + ["s_per_epoch", "best_epoch"]:
            vals = np.array([r[key] if r[key] is not None else np.nan for r in mine], dtype=float)
            stats[key] = (float(np.nanmean(vals)), float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0)
        out[name] = stats
    return out


def markdown_table(summary: dict[str, dict]) -> str:
    head = ("| recipe | seeds | Recall@10 | NDCG@10 | warm Recall@10 | warm NDCG@10 | cold Recall@10 | cold NDCG@10 "
            "| s/epoch |")
    lines = [head, "|---|---:|---|---|---|---|---|---|---:|"]
    for name, s in summary.items():
        cells = [f"{s[f'{p}_{m}'][0]:.4f} ± {s[f'{p}_{m}'][1]:.4f}" for p, m in METRICS]
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(cells) + f" | {s['s_per_epoch'][0]:.1f} |")
    return "\n".join(lines)


# The PixelRec-shaped table (--models): one row per (tower, metric), one column per model.
GRID_METRICS = [("overall", "ndcg@10", "NDCG@10"), ("warm", "ndcg@10", "warm NDCG@10"), ("cold", "recall@10", "cold Recall@10")]
GRID_RECIPES = ("id", "frozen", "hybrid")


def model_grid(models: list[str], recipes: dict[str, dict]) -> dict[str, dict]:
    """{"MODEL/RECIPE": overrides + --model MODEL} for every recipe and model (recipe-major: every model's
    first recipe is fitted before any model's second)."""
    return {f"{m}/{r}": {**overrides, "model.model": m} for r, overrides in recipes.items() for m in models}


def parse_models(text: str) -> list[str]:
    from pixelrec.recommend.models.registry import MODEL_SPECS

    models = [m for m, s in MODEL_SPECS.items() if s.sequential] if text == "all" else [m for m in text.split(",") if m]
    unknown = [m for m in models if m not in MODEL_SPECS]
    if unknown or not models:
        raise SystemExit(f"--models {text!r}: expected 'all' or a comma-separated list of {', '.join(MODEL_SPECS)}")
    return models


def grid_table(summary: dict[str, dict], models: list[str], recipes: list[str]) -> str:
    """Models across, towers down: mean ± sd over seeds of each GRID_METRICS metric, then s/epoch and the
    best epoch (counted from 0: one below the cap means the model was still improving)."""
    def cell(name: str, key: str, digits: int = 4) -> str:
        if name not in summary:
            return "–"
        mean, sd = summary[name][key]
        n = summary[name]["seeds"]
        return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")

    lines = ["| tower | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for recipe in recipes:
        for part, metric, label in GRID_METRICS:
            lines.append(f"| {recipe} | {label} | " + " | ".join(cell(f"{m}/{recipe}", f"{part}_{metric}")
                                                                  for m in models) + " |")
    for key, label, digits in (("s_per_epoch", "s/epoch", 1), ("best_epoch", "best epoch", 0)):
        for recipe in recipes:
            lines.append(f"| {recipe} | {label} | " + " | ".join(cell(f"{m}/{recipe}", key, digits) for m in models) + " |")
    seeds = sorted({summary[n]["seeds"] for n in summary})
    return "\n".join(lines) + f"\n(seeds per cell: {', '.join(map(str, seeds))})"


def targets(summary: dict[str, dict], candidate: str = "hybrid") -> list[str]:
    """The issue's two bars for `candidate` (and for every hybrid recipe, as ratios)."""
    if "id" not in summary or not any(k in summary for k in IMAGE_ONLY):
        return []
    id_warm = summary["id"]["warm_ndcg@10"][0]
    best_image = max(summary[k]["cold_recall@10"][0] for k in IMAGE_ONLY if k in summary)
    lines = [f"bars: warm NDCG@10 >= 0.98 x id ({0.98 * id_warm:.4f}); cold Recall@10 >= 0.9 x best image-only "
             f"({0.9 * best_image:.4f})"]
    for name, s in summary.items():
        if not name.startswith("hybrid"):
            continue
        w, c = s["warm_ndcg@10"][0] / id_warm, s["cold_recall@10"][0] / max(best_image, 1e-12)
        ok = "meets both" if w >= 0.98 and c >= 0.9 else "misses"
        lines.append(f"{'*' if name == candidate else ' '} {name:<22} warm NDCG@10 / id {w:.3f}   "
                     f"cold Recall@10 / best image-only {c:.3f}   {ok}")
    return lines


def plot_tradeoff(summary: dict[str, dict], path: str, title: str, frontier: list[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    placed: list[tuple[float, float, int]] = []  # labelled points and their label's level, to step nearby labels apart
    span = max((s["warm_ndcg@10"][0] for s in summary.values()), default=1.0) or 1.0
    for name, s in summary.items():
        x, xe = s["warm_ndcg@10"]
        y, ye = s["cold_recall@10"]
        marker = "s" if name in ("id",) + IMAGE_ONLY else ("*" if name == "hybrid" else "o")
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, markersize=11 if marker == "*" else 6, capsize=2)
        taken = {level for px, py, level in placed if abs(x - px) < 0.15 * span and abs(y - py) < 1e-3}
        level = min(set(range(len(placed) + 1)) - taken)
        placed.append((x, y, level))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 + 9 * level), fontsize=7)
    line = [name for name in frontier if name in summary]
    if len(line) > 1:  # e.g. the default recipe across ID-dropout rates
        ax.plot([summary[n]["warm_ndcg@10"][0] for n in line], [summary[n]["cold_recall@10"][0] for n in line],
                color="grey", linewidth=1, zorder=0)
    if "id" in summary:
        ax.axvline(0.98 * summary["id"]["warm_ndcg@10"][0], color="grey", linestyle=":", linewidth=1)
    best = [summary[k]["cold_recall@10"][0] for k in IMAGE_ONLY if k in summary]
    if best:
        ax.axhline(0.9 * max(best), color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="warm test NDCG@10", ylabel="cold test Recall@10",
           title=f"{title}\ndotted: 0.98 x id warm NDCG, 0.9 x best image-only cold Recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
# `--synthetic`: the demo's catalogue and fit settings (pixelrec/demo.py, DemoConfig), so the same
# recipes can be compared on the set where `pixelrec demo` reports them.
DEMO_DATA = dict(users=2000, items=400, cold_items=40, styles=8, image_size=32, seed=0)
DEMO_FIT = {"model.dim": 32, "model.max_len": 20, "train.epochs": 30, "train.patience": 5, "train.lr": 2e-3}


def synthetic_data(out: Path) -> tuple[Path, Path]:
    """(interactions, covers) of the demo's synthetic catalogue under out/synth."""
    from pixelrec.data.synth import SynthConfig, synthesize

    root = out / "synth"
    manifest = root / "synth.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        synthesize(root, SynthConfig(**DEMO_DATA))
    return root / "interactions.csv", root / "covers"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("interactions", nargs="?", help="ml100k.csv (item_id,user_id,timestamp)")
    ap.add_argument("items", nargs="?", help="ml100k_items.csv (item_id,title,year,genres)")
    ap.add_argument("--synthetic", action="store_true",
                    help="instead of ML-100K: the demo's synthetic catalogue and fit settings (seeds vary training only)")
    ap.add_argument("--out", default="runs/coldstart")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated: each seed draws its own cold items and trains")
    ap.add_argument("--cold-share", type=float, default=0.2)
    ap.add_argument("--recipes", default="", help=f"of {', '.join(RECIPES)} (default: {', '.join(DEFAULT_RECIPES)}; "
                    f"with --models: {', '.join(GRID_RECIPES)})")
    ap.add_argument("--models", default="", help="comma-separated models of `pixelrec fit --model`, or all (every "
                    "sequential one): every recipe with each, printed as the PixelRec-shaped table (models across, "
                    "towers down)")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME:section.field=value,...",
                    help="an extra recipe (repeatable); `cache=vit|vit-mean|hidden|hidden-mean|meta|random|meta+random` picks the features")
    ap.add_argument("--diagnose", action="store_true", help="also run the frozen diagnosis recipes (DIAGNOSIS)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="section.field=value",
                    help="change a setting in every recipe (repeatable)")
    ap.add_argument("--epochs", type=int, default=0, help="cap on epochs (0 = pixelrec's default)")
    ap.add_argument("--model-epochs", default="", metavar="MODEL=N,...",
                    help="with --models: a cap on epochs per model, instead of --epochs (e.g. for the models "
                    "trained on every prefix, whose epochs cost more)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--refit", action="store_true", help="fit again even where a result file exists")
    ap.add_argument("--report-only", action="store_true",
                    help="fit nothing: print the table of the result files already there (missing cells: –)")
    ap.add_argument("--plot", default="", help="write the warm/cold trade-off plot here (PNG)")
    ap.add_argument("--frontier", default=",".join(FRONTIER),
                    help="comma-separated recipes joined by a line in the plot (the ID-dropout sweep)")
    ap.add_argument("--json", action="store_true", help="also print every row as JSON")
    args = ap.parse_args()
    if not args.synthetic and not (args.interactions and args.items):
        ap.error("give the ML-100K interactions and items CSVs, or --synthetic")
    args.overrides = dict(parse_recipe("set:" + ",".join(args.sets))[1]) if args.sets else {}
    try:
        args.model_epochs = {m: int(n) for m, _, n in (p.partition("=") for p in args.model_epochs.split(",") if p)}
    except ValueError:
        ap.error(f"--model-epochs {args.model_epochs!r}: expected MODEL=N[,MODEL=N...]")
    if args.synthetic:
        args.overrides = {**DEMO_FIT, **args.overrides}

    from pixelrec.runtime import set_quiet

    set_quiet(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_recipes = GRID_RECIPES if args.models else DEFAULT_RECIPES
    names = [n for n in (args.recipes.split(",") if args.recipes else default_recipes) if n]
    if unknown := [n for n in names if n not in RECIPES]:
        ap.error(f"--recipes: unknown {', '.join(unknown)}; expected some of {', '.join(RECIPES)}")
    recipes = {n: RECIPES[n] for n in names}
    recipes.update(dict(parse_recipe(s) for s in args.recipe))
    if args.diagnose:
        recipes.update(DIAGNOSIS)
    models = parse_models(args.models) if args.models else []
    if models and (args.plot or args.diagnose):
        ap.error("--plot and --diagnose compare the recipes of one model; not with --models")
    tower_names = list(recipes)
    if models:
        recipes = model_grid(models, recipes)
    seeds = [int(s) for s in args.seeds.split(",")]

    if args.synthetic:
        synth_csv, covers = synthetic_data(out)
        meta = None
    else:
        covers, meta = write_covers(args.items, out)
    caches = {"vit": encode_covers(covers, out)}
    wanted = {o.get("cache", "vit") for o in recipes.values()}
    if "vit-mean" in wanted:
        caches["vit-mean"] = encode_covers(covers, out, "mean")
    for kind in wanted & set(HIDDEN_CACHES):
        caches[kind] = encode_covers(covers, out, hidden=HIDDEN_CACHES[kind])
    for kind in wanted - {"vit", "vit-mean", *HIDDEN_CACHES}:
        if meta is None:
            raise SystemExit(f"cache={kind}: controlled features exist for ML-100K only")
        caches[kind] = feature_cache(kind, meta, out)
    if not args.synthetic:
        df = load_interactions(args.interactions)
        items = sorted(meta.item_id.tolist())
    rows = []
    for seed in seeds:
        split = synth_csv if args.synthetic else write_split(df, items, args.cold_share, seed, out)
        print(f"seed {seed}: {json.dumps(split_summary(split))}", flush=True)
        for name, overrides in recipes.items():
            row = run_recipe(name, overrides, seed, split, caches, out, args)
            if row is None:
                print(f"  {name:<22} no result yet (--report-only)", flush=True)
                continue
            print(f"  {name:<22} warm N@10 {row['warm_ndcg@10']:.4f}  cold R@10 {row['cold_recall@10']:.4f}  "
                  f"overall N@10 {row['overall_ndcg@10']:.4f}  {row['s_per_epoch']:.1f} s/epoch  "
                  f"best {row['best_epoch']}/{row['epochs']}", flush=True)
            rows.append(row)

    summary = summarize(rows, list(recipes))
    if args.synthetic:
        print(f"\nThe demo's synthetic catalogue ({DEMO_DATA['users']} users, {DEMO_DATA['items']} items of which "
              f"{DEMO_DATA['cold_items']} cold), its fit settings; training seeds {args.seeds}; mean ± sd over seeds")
    else:
        print(f"\nML-100K cold start: {args.cold_share:.0%} of items cold (test targets only), covers from metadata, "
              f"{ENCODER} random init; seeds {args.seeds}; mean ± sd over seeds")
    if args.sets:
        print(f"changed in every recipe: {', '.join(args.sets)}")
    if models:
        print(grid_table(summary, models, tower_names))
        if args.json:
            print(json.dumps(rows))
        return
    print(markdown_table(summary))
    for line in targets(summary):
        print(line)
    if args.plot:
        plot_tradeoff(summary, args.plot, ("demo's synthetic set" if args.synthetic else "ML-100K cold start")
                      + f", {len(seeds)} seeds", list(filter(None, args.frontier.split(","))))
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
