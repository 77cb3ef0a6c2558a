"""The PixelRec table from one command: every model of `pixelrec fit --model` with the `id`, `frozen`
and `partial` item towers, printed in the paper's layout (models across; ID / frozen / partial down;
Recall@10 and NDCG@10 of the leave-one-out test item, full ranking), each cell linking to its runs.

    python benchmarks/pixelrec_table.py ml100k.csv ml100k_items.csv [--seeds 0,1] [--out runs/pixelrec_table]
        [--models sasrec,mf,...] [--towers id,frozen,partial] [--epochs N] [--set section.field=value]
    python benchmarks/pixelrec_table.py --synthetic 0.1 [...]     # a Pixel200K-shaped synthetic set
    python benchmarks/pixelrec_table.py Pixel200K.csv --cache pixel200k.h5 [...]   # real data, encoded cache

Data (one of):
- DATA ITEMS: an interactions CSV and an items CSV with title, year and genres (ML-100K): a cover per
  item is rendered from its metadata and encoded by the tiny random-init ViT, as benchmarks/coldstart.py
  does (its `render_cover`, `encode_covers`; split block 2, so the cache holds the tokens `partial` reads);
- DATA --covers DIR: the covers are given (one image per item id), encoded the same way;
- DATA --cache CACHE.h5: an encode cache made beforehand (`pixelrec encode --images COVERS --out
  CACHE.h5 --split-block N`, with the encoder of your choice): how to make the table on the real
  Pixel200K;
- --synthetic SCALE: `pixelrec.data.synth` (styles, sequential and visual signal) at the Pixel200K shape
  scaled by SCALE (200,000 users and 96,282 items at 1.0, sequences of 5 or more items averaging about
  20 as the published ones), 32 px covers.

Every model runs at its own defaults (the registry's, as `pixelrec fit --model M` alone), pixelrec's
shared defaults otherwise, or at `--preset pixelrec`'s values for it (the reference's); `--set` changes
a setting everywhere and `--epochs` caps the epochs.
A (model, tower) pair the model does not offer is not fitted: its cell says "n/a" and the table lists
the reason below it (the one line `pixelrec fit` refuses it with).

Every fitted cell is cached under --out: results/<model>/<tower>-seed<s>.json, the run in
runs/<model>-<tower>-seed<s>. A rerun reuses a result whose settings are the same; a process claims a
cell with a lock file while fitting it, so several processes given the same --out share the work
(each skips what another is fitting); run once more when they are done to print the whole table. A
cell whose fit was killed continues from its last finished epoch on the next run (when its settings
are unchanged), so a table of several CPU-hours can be made over several sittings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coldstart import _jsonable, encode_covers, parse_recipe, write_covers  # noqa: E402
from run_settings import changed_settings  # noqa: E402

TOWERS = {"id": "ID", "frozen": "frozen", "partial": "partial"}  # --items kind -> row label
METRICS = (("recall@10", "Recall@10"), ("ndcg@10", "NDCG@10"))
# Pixel200K's published shape (benchmarks/pixel200k.py): users, items; sequences of 5+ items, mean 19.8
P200K_USERS, P200K_ITEMS = 200_000, 96_282


@dataclass
class Cell:
    """One (model, tower) of the table: its result rows (one per seed) or why it was not fitted."""

    model: str
    tower: str
    rows: list[dict] = field(default_factory=list)
    na: str = ""  # the reason the model does not offer this tower
    pending: list[int] = field(default_factory=list)  # seeds another process is fitting (or not fitted yet)


# ------------------------------------------------------------------------------------------ cells
def cell_config(model: str, tower: str, seed: int, interactions: str, cache: str | None, run_dir: Path,
                overrides: dict, epochs: int, preset: str = ""):
    """The FitConfig of one cell (not validated): the model's defaults, or `preset`'s values for it, then
    `overrides` (`--set`)."""
    from pixelrec.recommend.config import FitConfig, apply_preset
    from pixelrec.recommend.models.registry import CACHE_MODELS

    cfg = FitConfig(interactions=str(interactions), out=str(run_dir))
    cfg.set("model.model", model)
    cfg.set("items.kind", tower)
    if preset:
        apply_preset(cfg, preset, set(overrides))
    for key, value in overrides.items():
        cfg.set(key, value)
    # the image towers read the cache, and so do the models that read it whatever the tower (ACF's tokens)
    cfg.items.cache = cache if cfg.items.uses_cache or model in CACHE_MODELS else None
    cfg.train.seed = seed
    if epochs:
        cfg.train.epochs = epochs
    return cfg


def not_offered(cfg) -> str:
    """'' when `pixelrec fit` accepts the configuration, else its one-line refusal."""
    from pixelrec.errors import PixelrecError

    try:
        cfg.validate()
    except PixelrecError as exc:
        return str(exc)
    return ""


def result_path(out: Path, model: str, tower: str, seed: int) -> Path:
    return out / "results" / model / f"{tower}-seed{seed}.json"


def run_path(out: Path, model: str, tower: str, seed: int) -> Path:
    return out / "runs" / f"{model}-{tower}-seed{seed}"


def cached_row(path: Path, settings: dict) -> dict | None:
    """The saved result at `path` when it was made with the same settings, else None."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if row.get("settings") == settings else None


def claim(path: Path) -> bool:
    """Take the lock file of a cell (True), or False when a live process holds it. A lock whose process
    is gone (killed run) is taken over."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:  # alive, another user's
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def write_json(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)


def fit_cell(cfg, path: Path, settings: dict, resume: bool = True) -> dict:
    """Fit one configuration and save its result row at `path`. With `resume`, a run directory left by a
    fit that was killed (a finished epoch, no result row) is continued from its last epoch when its
    settings are these (`pixelrec fit --resume`'s check); otherwise it is fitted again from the start."""
    from pixelrec.errors import PixelrecError
    from pixelrec.runs.fit import fit
    from pixelrec.runs.rundir import RunDir

    t0 = time.time()
    res, continued = None, False
    if resume and RunDir(cfg.out).last.is_file():
        cell = f"{cfg.model.model}/{cfg.items.kind} seed {cfg.train.seed}"
        try:
            res, continued = fit(cfg, resume=True), True
            print(f"  {cell}: continued the killed fit in {cfg.out}", flush=True)
        except PixelrecError as exc:
            print(f"  {cell}: not continued ({exc}); fitting from the start", flush=True)
    if res is None:
        res = fit(cfg, overwrite=True)
    row = {"model": cfg.model.model, "tower": cfg.items.kind, "seed": cfg.train.seed, "settings": settings,
           "run": str(res.run_dir), **{m: res.test["overall"][m] for m, _ in METRICS},
           "s_per_epoch": res.seconds_per_epoch, "best_epoch": res.best_epoch, "epochs": res.epochs_run,
           "wall_s": round(time.time() - t0, 1), **({"continued": True} if continued else {})}
    write_json(path, row)  # wall_s: this sitting only when continued (s_per_epoch is over every epoch)
    return row


def run_cell(model: str, tower: str, seeds: list[int], data: dict, out: Path, args, fit: bool = True) -> Cell:
    """Every seed of one cell: cached results reused, missing ones fitted (when `fit` and unclaimed)."""
    from pixelrec.errors import PixelrecError

    cell = Cell(model, tower)
    for seed in seeds:
        cfg = cell_config(model, tower, seed, data["interactions"], data["cache"], run_path(out, model, tower, seed),
                          args.overrides, args.epochs, args.preset)
        cell.na = not_offered(cfg)
        if cell.na:
            return cell
        settings = _jsonable({"overrides": args.overrides, "epochs_cap": args.epochs, "data": data["name"],
                              **({"preset": args.preset} if args.preset else {})})
        path = result_path(out, model, tower, seed)
        row = None if args.refit else cached_row(path, settings)
        changed = changed_settings(cfg, row["run"]) if row and row.get("run") else []
        if changed:  # fitted under other defaults (an older pixelrec)
            print(f"  {model}/{tower} seed {seed}: the cached result was fitted with other settings "
                  f"({'; '.join(changed)}): {'fitting again' if fit else 'not used'}", flush=True)
            row = None
        if row is None and fit and claim(path):
            try:
                print(f"  fitting {model}/{tower} seed {seed} ...", flush=True)
                row = fit_cell(cfg, path, settings, resume=not args.refit)
            except PixelrecError as exc:  # refused once the data is read (e.g. a cache without tokens)
                cell.na = str(exc)
                return cell
            finally:
                path.with_suffix(".lock").unlink(missing_ok=True)
            print(f"  {model}/{tower} seed {seed}: R@10 {row['recall@10']:.4f} N@10 {row['ndcg@10']:.4f} "
                  f"best {row['best_epoch']}/{row['epochs']} {row['s_per_epoch']:.1f} s/epoch", flush=True)
        if row is None:
            cell.pending.append(seed)
        else:
            cell.rows.append(row)
    return cell


# ------------------------------------------------------------------------------------------ table
def stat(cell: Cell, metric: str) -> tuple[float, float]:
    vals = np.array([r[metric] for r in cell.rows], dtype=float)
    return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)


def cell_text(cell: Cell, metric: str, links: bool, base: Path | None = None) -> str:
    """'0.0712', '0.0712 ± 0.0030' over seeds, 'n/a', or '–' (not fitted yet); with `links`, the value
    links to the first seed's run directory and each further seed is a link [sN]."""
    if cell.na:
        return "n/a"
    if not cell.rows:
        return "–"
    mean, sd = stat(cell, metric)
    text = f"{mean:.4f}" + (f" ± {sd:.4f}" if len(cell.rows) > 1 else "")
    if links:
        def rel(row: dict) -> str:
            path = Path(row["run"])
            return os.path.relpath(path, base) if base is not None else str(path)
        first, rest = cell.rows[0], cell.rows[1:]
        text = f"[{text}]({rel(first)})" + "".join(f" [s{r['seed']}]({rel(r)})" for r in rest)
    if cell.pending:
        text += f" ({len(cell.rows)}/{len(cell.rows) + len(cell.pending)} seeds)"
    return text


def table_rows(cells: dict[tuple[str, str], Cell], models: list[str], towers: list[str], links: bool,
               base: Path | None = None) -> list[list[str]]:
    """[header, row per (tower, metric)]: models across, towers down."""
    rows = [["tower", "metric", *models]]
    for tower in towers:
        for metric, label in METRICS:
            rows.append([TOWERS[tower], label, *(cell_text(cells[m, tower], metric, links, base) for m in models)])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|---|" + "---:|" * (len(rows[0]) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def na_notes(cells: dict[tuple[str, str], Cell]) -> list[str]:
    return [f"n/a {m}/{TOWERS[t]}: {c.na}" for (m, t), c in cells.items() if c.na]


# ------------------------------------------------------------------------------------------- data
def synthetic_config(scale: float):
    """pixelrec.data.synth at the Pixel200K shape scaled by `scale` (see the module doc)."""
    from pixelrec.data.synth import SynthConfig

    # synth's lengths: min_len + Exp((max_len - min_len) / 4), capped: 5 + Exp(15) averages about 20
    return SynthConfig(users=max(50, round(P200K_USERS * scale)), items=max(50, round(P200K_ITEMS * scale)),
                       cold_items=0, image_size=32, min_len=5, max_len=65, seed=0)


def prepare_data(args, out: Path) -> dict:
    """{"name", "interactions", "cache"}: the interactions file and the encode cache of the table."""
    if args.synthetic:
        from pixelrec.data.synth import synthesize

        root = out / "synth"
        manifest = root / "synth.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
            synthesize(root, synthetic_config(args.synthetic))
        return {"name": f"pixel200k-synth-x{args.synthetic:g}", "interactions": str(root / "interactions.csv"),
                "cache": str(encode_covers(root / "covers", out))}
    if args.cache:
        cache = args.cache
    elif args.covers:
        cache = str(encode_covers(Path(args.covers), out))
    else:
        covers, _ = write_covers(args.items, out)
        cache = str(encode_covers(covers, out))
    return {"name": Path(args.data).name, "interactions": args.data, "cache": cache}


def parse_list(text: str, known, what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"--{what}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    if not names:
        raise SystemExit(f"--{what}: give at least one of {', '.join(known)}")
    return names


def main(argv=None) -> None:
    from pixelrec.recommend.models.registry import MODEL_SPECS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", help="interactions CSV (item_id,user_id,timestamp)")
    ap.add_argument("items", nargs="?", help="items CSV (item_id,title,year,genres): covers rendered from it")
    ap.add_argument("--covers", default="", help="instead of ITEMS: a folder of covers, one per item id")
    ap.add_argument("--cache", default="", help="instead of ITEMS: an encode cache (with split-block tokens)")
    ap.add_argument("--synthetic", type=float, default=0.0, metavar="SCALE",
                    help="instead of DATA: a synthetic set of the Pixel200K shape at this scale (e.g. 0.1)")
    ap.add_argument("--out", default="", help="results, runs, covers and cache (default runs/pixelrec_table/<data>)")
    ap.add_argument("--models", default=",".join(MODEL_SPECS), help="comma-separated (default: every model)")
    ap.add_argument("--towers", default=",".join(TOWERS), help="comma-separated of id, frozen, partial")
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--epochs", type=int, default=0, help="cap on epochs (0 = pixelrec's default)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="section.field=value",
                    help="change a setting in every cell (repeatable)")
    ap.add_argument("--preset", default="", help="every cell at this preset's values for its model (`fit --preset`)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--refit", action="store_true", help="fit again even where a result file exists")
    ap.add_argument("--no-fit", action="store_true", help="print the table of what is cached; fit nothing")
    ap.add_argument("--markdown-links", default="", metavar="DIR",
                    help="links in the markdown table relative to this folder (default: as stored)")
    args = ap.parse_args(argv)
    if args.synthetic:
        if args.data or args.cache or args.covers:
            ap.error("--synthetic makes its own data: give no DATA, --covers or --cache")
    elif not args.data or sum(map(bool, (args.items, args.covers, args.cache))) != 1:
        ap.error("give DATA and one of ITEMS, --covers DIR or --cache CACHE.h5 (or --synthetic SCALE)")
    if args.epochs < 0:
        ap.error("--epochs must be at least 0")
    models = parse_list(args.models, list(MODEL_SPECS), "models")
    towers = parse_list(args.towers, list(TOWERS), "towers")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected integers separated by commas")
    args.overrides = dict(parse_recipe("set:" + ",".join(args.sets))[1]) if args.sets else {}
    args.overrides["train.device"] = args.device

    from pixelrec.runtime import set_quiet

    set_quiet(True)
    name = f"synth-x{args.synthetic:g}" if args.synthetic else Path(args.data).stem
    out = Path(args.out or Path("runs") / "pixelrec_table" / name)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    cells = {(m, t): run_cell(m, t, seeds, data, out, args, fit=not args.no_fit) for t in towers for m in models}
    base = Path(args.markdown_links) if args.markdown_links else None
    print(f"\n{data['name']}: test Recall@10 / NDCG@10 (leave-one-out, full ranking), seeds {args.seeds}"
          + (f", epochs capped at {args.epochs}" if args.epochs else "")
          + (f", preset {args.preset}" if args.preset else "")
          + (f", set {', '.join(args.sets)}" if args.sets else ""))
    print(markdown(table_rows(cells, models, towers, links=True, base=base)))
    print()
    print(plain(table_rows(cells, models, towers, links=False)))
    for line in na_notes(cells):
        print(line)
    if any(c.pending for c in cells.values()):
        print("– : not fitted yet (another process holds it, or --no-fit)")


if __name__ == "__main__":
    main()
