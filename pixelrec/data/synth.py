"""Synthetic PixelRec-format datasets (`pixelrec synth`) for tests and the demo.

Every item has one of `styles` visual styles: a background hue (hues evenly spread around the
colour wheel) and a foreground motif (circle, stripes, checker, ...), drawn with per-item jitter in
position, size, colour and pixel noise, so covers of one style look alike without being equal.

Users' sequences follow the pictures: a user likes one or two styles; each next style repeats the
previous one with probability `p_stay`, else moves to its successor style (s -> s+1 mod S) with
probability `p_next`, else is drawn from the user's liked styles. The item is then drawn from that
style by Zipf popularity, never repeating an item within a user. `cold_items` items occur only as
the final (test) interaction of some users, chosen by the same dynamics restricted to cold items.

Output: interactions.csv, items.csv, covers/<item_id>.jpg, optionally covers.lmdb (PixelRec's
LMDB format), and synth.json (config and ground truth). The same config gives byte-identical CSVs
and identical pixels. `style_seed` fixes the styles' look independently of `seed`, so datasets
with different seeds share styles (cross-dataset transfer tests).
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import PixelrecError
from ..runtime import atomic_path, log, progress, write_json
from .ids import id_problem, shown
from .lmdb_writer import write_pixelrec_lmdb

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross",
          "hstripes", "vstripes", "dstripes", "checker", "dots")
_COLOUR_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure",
                 "blue", "violet", "magenta", "pink")
_ADJECTIVES = ("quiet", "bright", "hidden", "golden", "lost", "wild", "silver", "late",
               "first", "deep", "little", "open", "broken", "electric", "paper", "northern")
_NOUNS = ("river", "garden", "city", "song", "road", "harbor", "forest", "signal",
          "winter", "story", "island", "machine", "window", "orbit", "letter", "mirror")
_RENDER_CHUNK = 256
_START_TIME = 1_600_000_000
MANIFEST = "synth.json"
_OUTPUTS = ("interactions.csv", "items.csv", "covers", "covers.lmdb", MANIFEST)

# Limits that keep a synthetic dataset within a few GB of memory: covers are rendered 256 at a time
# as float32 pixels (about 3 GB at 512 x 512), and every interaction costs a few arrays of int64.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512
MAX_USERS = 1_000_000
MAX_ITEMS = 1_000_000
MAX_STYLES = 1_000
MAX_LEN = 1_000
MAX_USERS_X_LEN = 20_000_000
MAX_SEED = 2**32 - 1
MAX_PREFIX_LEN = 100
_FORBIDDEN_IN_IDS = frozenset("/\\,\"")  # path separators, the CSV separator and quote


@dataclass
class SynthConfig:
    """Size, randomness and dynamics of a synthetic dataset (`items` includes the cold items)."""

    users: int = 5000
    items: int = 2000
    cold_items: int = 100
    seed: int = 0
    image_size: int = 64
    styles: int = 12
    min_len: int = 5
    max_len: int = 40
    zipf: float = 1.0
    appeal: float = 0.8  # how much an item's popularity shows on its cover (contrast): 0 = not at all, 1 = fully
    p_stay: float = 0.5
    p_next: float = 0.3
    p_two_styles: float = 0.5
    cold_user_frac: float = 0.1
    item_prefix: str = "i"
    user_prefix: str = "u"
    style_seed: int | None = None
    write_lmdb: bool = False
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise PixelrecError naming the first setting that cannot work (or would not fit in memory)."""
        checks = [
            (1 <= self.users <= MAX_USERS, f"--users must be between 1 and {MAX_USERS:,} (got {self.users})"),
            (1 <= self.styles <= MAX_STYLES, f"--styles must be between 1 and {MAX_STYLES} (got {self.styles})"),
            (self.items >= self.styles, f"--items {self.items} must be >= --styles {self.styles}"),
            (self.items <= MAX_ITEMS, f"--items must be at most {MAX_ITEMS:,} (got {self.items})"),
            (0 <= self.cold_items <= self.items - self.styles,
             f"--cold-items {self.cold_items} must be between 0 and items - styles = {self.items - self.styles} "
             f"(every style keeps a warm item)"),
            (self.items - self.cold_items >= self.max_len,
             f"--items minus --cold-items must be >= --max-len {self.max_len} (users never repeat an item)"),
            (self.min_len >= 3, "--min-len must be >= 3 (train, validation and test interactions)"),
            (self.max_len >= self.min_len, f"--max-len {self.max_len} must be >= --min-len {self.min_len}"),
            (self.max_len <= MAX_LEN, f"--max-len must be at most {MAX_LEN} (got {self.max_len})"),
            (self.users * self.max_len <= MAX_USERS_X_LEN,
             f"--users x --max-len must be at most {MAX_USERS_X_LEN:,} (got {self.users * self.max_len:,}); "
             f"ask for fewer users or shorter sequences"),
            (MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
             f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels (got {self.image_size})"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED} (got {self.seed})"),
            (self.style_seed is None or 0 <= self.style_seed <= MAX_SEED,
             f"--style-seed must be between 0 and {MAX_SEED} (got {self.style_seed})"),
            (0 <= self.p_stay and 0 <= self.p_next and self.p_stay + self.p_next <= 1,
             "p_stay and p_next must be >= 0 with p_stay + p_next <= 1"),
            (0 <= self.p_two_styles <= 1 and 0 <= self.cold_user_frac <= 1,
             "p_two_styles and cold_user_frac must be in [0, 1]"),
            (0 <= self.zipf < math.inf, "zipf exponent must be a finite number >= 0"),
            (0 <= self.appeal <= 1, "appeal must be in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality must be in 1..100"),
        ]
        for ok, message in checks:
            if not ok:
                raise PixelrecError(message)
        for flag, prefix in (("--item-prefix", self.item_prefix), ("--user-prefix", self.user_prefix)):
            problem = id_prefix_problem(prefix)
            if problem:
                raise PixelrecError(f"{flag} {prefix!r}: {problem}")


def id_prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot start item or user ids, or None. Item ids become cover file names and
    both kinds of ids are CSV fields, so a prefix must be a plain, non-empty piece of a file name."""
    if not prefix:
        return "must not be empty"
    if len(prefix) > MAX_PREFIX_LEN:
        return f"must be at most {MAX_PREFIX_LEN} characters (ids become file names)"
    bad = sorted({c for c in prefix if c in _FORBIDDEN_IN_IDS or not c.isprintable()})
    if bad:
        listed = ", ".join(repr(c) for c in bad)
        return f"must not contain {listed} (ids become file names and CSV fields)"
    if prefix.startswith(".") or prefix != prefix.strip():
        return "must not start with a dot or start or end with whitespace (ids become file names)"
    longest = f"{prefix}{MAX_ITEMS:d}"  # the widest id a synth can make (data.ids applies to every id)
    problem = id_problem(longest)
    return None if problem is None else f"makes ids like {shown(longest)} that are not valid ids: {problem}"


@dataclass
class SynthSummary:
    """What `synthesize` wrote, with the ground truth tests need."""

    out_dir: Path
    interactions: Path
    items: Path
    covers: Path
    lmdb: Path | None
    manifest: Path
    n_users: int
    n_items: int
    n_interactions: int
    n_cold: int
    top10_share: float  # share of interactions held by the 10% most popular items
    seconds: float
    cold_item_ids: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Styles and rendering


@dataclass
class _Styles:
    background: np.ndarray  # [S, 3] float RGB 0..255
    foreground: np.ndarray  # [S, 3]
    shape: np.ndarray       # [S] index into SHAPES
    hue: np.ndarray         # [S] background hue in [0, 1)


def _make_styles(n: int, rng: np.random.Generator) -> _Styles:
    hue = (rng.random() + _hue_slots(n, rng) / n) % 1.0
    background, foreground = np.empty((n, 3)), np.empty((n, 3))
    for s in range(n):
        value = rng.uniform(0.55, 0.9)
        background[s] = colorsys.hsv_to_rgb(hue[s], rng.uniform(0.55, 0.9), value)
        fg_value = rng.uniform(0.1, 0.3) if value > 0.72 else rng.uniform(0.9, 1.0)
        foreground[s] = colorsys.hsv_to_rgb((hue[s] + rng.uniform(0.35, 0.65)) % 1.0,
                                            rng.uniform(0.2, 0.9), fg_value)
    shape = rng.permutation(len(SHAPES))[np.arange(n) % len(SHAPES)]
    return _Styles(background * 255, foreground * 255, shape, hue)


def _hue_slots(n: int, rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
    """Evenly spaced hue slots in random order; styles sharing a shape (s and s + len(SHAPES))
    get slots far apart on the colour wheel when a random order allows it."""
    copies = math.ceil(n / len(SHAPES))
    need = n // (2 * copies) if copies > 1 else 0
    for _ in range(tries):
        slots = rng.permutation(n)
        pairs = [(a, b) for a in range(n) for b in range(a + len(SHAPES), n, len(SHAPES))]
        if all(min(abs(slots[a] - slots[b]), n - abs(slots[a] - slots[b])) >= need for a, b in pairs):
            break
    return slots


def _style_name(styles: _Styles, s: int) -> tuple[str, str]:
    colour = _COLOUR_NAMES[int(styles.hue[s] * len(_COLOUR_NAMES)) % len(_COLOUR_NAMES)]
    return colour, SHAPES[styles.shape[s]]


def _shape_masks() -> dict[str, Callable[..., np.ndarray]]:
    """Per shape: (x, y [P, P]; cx, cy, r, f, ph [n, 1, 1]) -> bool mask [n, P, P]."""
    def stripes(t, f, ph):
        return np.sin(2 * np.pi * (f * t + ph)) > 0

    return {
        "circle": lambda x, y, cx, cy, r, f, ph: (x - cx) ** 2 + (y - cy) ** 2 < r**2,
        "square": lambda x, y, cx, cy, r, f, ph: np.maximum(abs(x - cx), abs(y - cy)) < 0.85 * r,
        "triangle": lambda x, y, cx, cy, r, f, ph: (abs(y - cy) < r) & (abs(x - cx) < (y - cy + r) / 2),
        "diamond": lambda x, y, cx, cy, r, f, ph: abs(x - cx) + abs(y - cy) < 1.2 * r,
        "ring": lambda x, y, cx, cy, r, f, ph: abs(np.hypot(x - cx, y - cy) - 0.78 * r) < 0.22 * r,
        "cross": lambda x, y, cx, cy, r, f, ph: ((abs(x - cx) < r / 3) & (abs(y - cy) < r))
        | ((abs(y - cy) < r / 3) & (abs(x - cx) < r)),
        "hstripes": lambda x, y, cx, cy, r, f, ph: stripes(y, f, ph),
        "vstripes": lambda x, y, cx, cy, r, f, ph: stripes(x, f, ph),
        "dstripes": lambda x, y, cx, cy, r, f, ph: stripes((x + y) / math.sqrt(2), f, ph),
        "checker": lambda x, y, cx, cy, r, f, ph: (np.floor(f / 2 * x + ph) + np.floor(f / 2 * y + ph)) % 2 == 0,
        "dots": lambda x, y, cx, cy, r, f, ph: ((f * x + ph) % 1 - 0.5) ** 2 + ((f * y + ph) % 1 - 0.5) ** 2 < 0.09,
    }


def _render(item_style: np.ndarray, styles: _Styles, size: int, rng: np.random.Generator,
            appeal: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 covers [n, size, size, 3] chunk by chunk, in item order.

    `appeal` [n] in [0, 1] sets the contrast of the shape against its background (0.35 .. 1), so a
    cover's look says how attractive the item is (users pick attractive items more often).
    """
    n = len(item_style)
    params = {  # per-item jitter, drawn for all items up front so chunking cannot change it
        "cx": rng.uniform(0.3, 0.7, n), "cy": rng.uniform(0.3, 0.7, n), "r": rng.uniform(0.18, 0.3, n),
        "f": rng.uniform(2.5, 5.0, n), "ph": rng.random(n),
    }
    bg32 = (styles.background[item_style] + rng.normal(0, 10, (n, 3))).astype(np.float32)
    fg32 = (styles.foreground[item_style] + rng.normal(0, 10, (n, 3))).astype(np.float32)
    if appeal is not None:
        contrast = (0.35 + 0.65 * appeal).astype(np.float32)[:, None]
        fg32 = bg32 + contrast * (fg32 - bg32)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = grid[None, :], grid[:, None]
    masks = _shape_masks()
    for start in range(0, n, _RENDER_CHUNK):
        idx = np.arange(start, min(n, start + _RENDER_CHUNK))
        mask = np.zeros((len(idx), size, size), dtype=bool)
        kinds = styles.shape[item_style[idx]]
        for kind in np.unique(kinds):
            sel = kinds == kind
            p = {k: v[idx[sel]][:, None, None] for k, v in params.items()}
            mask[sel] = masks[SHAPES[kind]](x, y, **p)
        img = np.where(mask[..., None], fg32[idx][:, None, None, :], bg32[idx][:, None, None, :])
        img += 6 * rng.standard_normal(img.shape, dtype=np.float32)
        yield np.clip(img, 0, 255).round().astype(np.uint8)


def _jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Interactions


@dataclass
class _Catalogue:
    style: np.ndarray   # [M] style per item
    weight: np.ndarray  # [M] Zipf popularity weight
    cold: np.ndarray    # [M] bool


def _simulate_styles(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-user sequence lengths [U] and style sequences [U, max_len] (valid up to each length)."""
    U, S = cfg.users, cfg.styles
    scale = max(cfg.max_len - cfg.min_len, 1) / 4
    lengths = np.minimum(cfg.min_len + np.floor(rng.exponential(scale, U)).astype(np.int64), cfg.max_len)
    liked = rng.integers(0, S, (U, 2))
    liked[:, 1] = (liked[:, 0] + rng.integers(1, S, U)) % S if S > 1 else 0
    two = rng.random(U) < cfg.p_two_styles

    def from_taste() -> np.ndarray:
        return np.where(two & (rng.random(U) < 0.5), liked[:, 1], liked[:, 0])

    seq = np.empty((U, cfg.max_len), dtype=np.int64)
    seq[:, 0] = from_taste()
    for t in range(1, cfg.max_len):
        u, prev, taste = rng.random(U), seq[:, t - 1], from_taste()
        seq[:, t] = np.where(u < cfg.p_stay, prev, np.where(u < cfg.p_stay + cfg.p_next, (prev + 1) % S, taste))
    return lengths, seq


def _apportion(total: int, demand: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Split `total` over styles in proportion to `demand`, never above `cap` (largest remainder)."""
    share = total * demand / max(demand.sum(), 1)
    out = np.minimum(np.floor(share).astype(np.int64), cap)
    while out.sum() < total:
        room = out < cap
        gap = np.where(room, share - out, -np.inf)
        if not np.isfinite(gap).any():
            break
        out[int(np.argmax(gap))] += 1
    return out


def _draw(rng: np.random.Generator, candidates: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    p = weight[candidates]
    return rng.choice(candidates, size=n, p=p / p.sum())


def _pick_cold(cfg: SynthConfig, cat: _Catalogue, final_style: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Choose the cold items (per style, as many as that style's test demand warrants) and the users
    whose final item is cold; returns (cold user indices, their cold items), covering every cold
    item once when there are enough users."""
    S = cfg.styles
    per_style = np.bincount(cat.style, minlength=S)
    demand = np.bincount(final_style, minlength=S)
    cap = per_style - 1 if cfg.cold_items > cfg.users else np.minimum(per_style - 1, demand)
    if cap.sum() < cfg.cold_items:
        cap = per_style - 1
    n_cold = _apportion(cfg.cold_items, demand, cap)
    users, items = [], []
    for s in range(S):
        if n_cold[s] == 0:
            continue
        cold_s = rng.choice(np.flatnonzero(cat.style == s), n_cold[s], replace=False)
        cat.cold[cold_s] = True
        candidates = rng.permutation(np.flatnonzero(final_style == s))
        k = min(len(candidates), max(n_cold[s], round(cfg.cold_user_frac * len(candidates))))
        chosen = candidates[:k]
        covering = cold_s[: min(k, n_cold[s])]
        rest = _draw(rng, cold_s, cat.weight, k - len(covering)) if k > len(covering) else covering[:0]
        users.append(chosen)
        items.append(np.concatenate([covering, rest]))
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def _draw_warm(cfg: SynthConfig, cat: _Catalogue, pos_style: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    items = np.empty(len(pos_style), dtype=np.int64)
    for s in range(cfg.styles):
        where = np.flatnonzero(pos_style == s)
        if len(where):
            items[where] = _draw(rng, np.flatnonzero((cat.style == s) & ~cat.cold), cat.weight, len(where))
    return items


def _repeats(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Positions (rows are ordered by user then time) holding an item the user already had."""
    key = user * n_items + item
    order = np.lexsort((np.arange(len(key)), key))
    later = np.flatnonzero(key[order][1:] == key[order][:-1]) + 1
    return np.sort(order[later])


def _remove_repeats(cfg: SynthConfig, cat: _Catalogue, user: np.ndarray, style: np.ndarray, item: np.ndarray,
                    bounds: np.ndarray, rng: np.random.Generator) -> None:
    """Redraw repeated items in place; after a few vectorised rounds, pick an unseen item of the same
    style (or, if the user has seen them all, any unseen warm item)."""
    for _ in range(10):
        rep = _repeats(user, item, len(cat.style))
        if not len(rep):
            return
        item[rep] = _draw_warm(cfg, cat, style[rep], rng)
    warm = ~cat.cold
    for p in _repeats(user, item, len(cat.style)):
        seen = np.zeros(len(cat.style), dtype=bool)
        seen[item[bounds[user[p]]: bounds[user[p] + 1]]] = True
        pool = np.flatnonzero(warm & ~seen & (cat.style == style[p]))
        if not len(pool):
            pool = np.flatnonzero(warm & ~seen)
        item[p] = _draw(rng, pool, cat.weight, 1)[0]


def _cover_warm_items(cat: _Catalogue, user: np.ndarray, style: np.ndarray, item: np.ndarray,
                      train: np.ndarray, bounds: np.ndarray, rng: np.random.Generator) -> None:
    """Give every warm item at least one training interaction where possible: replace a training
    interaction of the same style whose item occurs elsewhere in training too."""
    counts = np.bincount(item[train], minlength=len(cat.style))
    missing = np.flatnonzero(~cat.cold & (counts == 0))
    slots = {s: iter(rng.permutation(np.flatnonzero(train & (style == s)))) for s in np.unique(cat.style[missing])}
    for i in missing:
        for p in slots[cat.style[i]]:
            if counts[item[p]] >= 2 and i not in item[bounds[user[p]]: bounds[user[p] + 1]]:
                counts[item[p]] -= 1
                item[p], counts[i] = i, 1
                break


def _interactions(cfg: SynthConfig, cat: _Catalogue, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Build the (user, item, timestamp) rows; returns them and the cold item indices used."""
    lengths, seq = _simulate_styles(cfg, rng)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    user = np.repeat(np.arange(cfg.users), lengths)
    step = np.arange(len(user)) - bounds[user]
    style = seq[user, step]
    last = bounds[1:] - 1

    cold_users, cold_targets = _pick_cold(cfg, cat, style[last], rng)
    item = _draw_warm(cfg, cat, style, rng)
    item[last[cold_users]] = cold_targets
    _remove_repeats(cfg, cat, user, style, item, bounds, rng)
    _cover_warm_items(cat, user, style, item, step < (lengths[user] - 2), bounds, rng)

    start = _START_TIME + rng.integers(0, 180 * 86400, cfg.users)
    gaps = rng.integers(60, 3 * 86400, len(user))
    timestamp = start[user] + np.cumsum(gaps) - np.cumsum(gaps)[bounds[user]] + gaps[bounds[user]]
    order = np.lexsort((user, timestamp))
    rows = pd.DataFrame({"item": item[order], "user": user[order], "timestamp": timestamp[order]})
    return rows, np.unique(cold_targets)


# --------------------------------------------------------------------------------------------
# Public API


def synthesize(out_dir: str | os.PathLike, cfg: SynthConfig | None = None) -> SynthSummary:
    """Write a synthetic PixelRec-format dataset into `out_dir` (see the module doc).

    `out_dir` must be new, empty, or an earlier synth output (which is deleted first). synth.json
    says `"complete": true` only once everything is written.
    """
    cfg = cfg or SynthConfig()
    cfg.validate()
    began = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out)

    data_seed = np.random.SeedSequence(cfg.seed)
    item_rng, seq_rng, pixel_rng = (np.random.default_rng(s) for s in data_seed.spawn(3))
    style_entropy = cfg.seed if cfg.style_seed is None else cfg.style_seed
    styles = _make_styles(cfg.styles, np.random.default_rng(np.random.SeedSequence(style_entropy, spawn_key=(99,))))

    M = cfg.items
    cat = _Catalogue(style=item_rng.permutation(np.arange(M) % cfg.styles),
                     weight=1.0 / (item_rng.permutation(M) + 1.0) ** cfg.zipf,
                     cold=np.zeros(M, dtype=bool))
    item_ids = _ids(cfg.item_prefix, M)
    user_ids = _ids(cfg.user_prefix, cfg.users)

    rows, cold_used = _interactions(cfg, cat, seq_rng)
    covers = _write_covers(out, item_ids, cat.style, styles, cfg, pixel_rng, _appeal(cat.weight, cfg.appeal, item_rng))
    items_csv = _write_items(out / "items.csv", item_ids, cat.style, styles, item_rng)
    interactions_csv = out / "interactions.csv"
    with atomic_path(interactions_csv) as tmp:
        pd.DataFrame({"item_id": item_ids[rows["item"].to_numpy()], "user_id": user_ids[rows["user"].to_numpy()],
                      "timestamp": rows["timestamp"].to_numpy()}).to_csv(tmp, index=False, lineterminator="\n")
    lmdb_path = None
    if cfg.write_lmdb:
        lmdb_path = out / "covers.lmdb"
        write_pixelrec_lmdb(lmdb_path, ((i, _read_rgb(covers / f"{i}.jpg")) for i in item_ids))

    counts = np.sort(np.bincount(rows["item"].to_numpy(), minlength=M))[::-1]
    top10 = float(counts[: max(1, math.ceil(0.1 * M))].sum() / counts.sum())
    cold_ids = [str(i) for i in item_ids[np.flatnonzero(cat.cold)]]
    manifest = out / MANIFEST
    write_json(manifest, {"complete": True, "config": asdict(cfg), "n_users": cfg.users, "n_items": M, "n_interactions": len(rows),
                          "cold_items": cold_ids, "cold_items_as_targets": int(len(cold_used)),
                          "top10_share": round(top10, 4),
                          "styles": [{"style": s, "colour": _style_name(styles, s)[0], "shape": _style_name(styles, s)[1]}
                                     for s in range(cfg.styles)]})
    seconds = time.perf_counter() - began
    log(f"synth: {cfg.users} users, {M} items ({len(cold_ids)} cold), {len(rows)} interactions, "
        f"top 10% items hold {top10:.0%} of interactions, {seconds:.1f}s -> {out}")
    return SynthSummary(out_dir=out, interactions=interactions_csv, items=items_csv, covers=covers, lmdb=lmdb_path,
                        manifest=manifest, n_users=cfg.users, n_items=M, n_interactions=len(rows),
                        n_cold=len(cold_ids), top10_share=top10, seconds=seconds, cold_item_ids=cold_ids)


def style_of(out_dir: str | os.PathLike) -> dict[str, int]:
    """Ground-truth style per item id, read from a synth dataset's items.csv."""
    df = pd.read_csv(Path(out_dir) / "items.csv", dtype={"item_id": str, "style": np.int64})
    return dict(zip(df["item_id"], df["style"].astype(int)))


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(5, len(str(n - 1)))
    return np.array([f"{prefix}{k:0{width}d}" for k in range(n)], dtype=object)


def _prepare_out_dir(out: Path) -> None:
    """Create `out`, or clear an earlier synth output in it (recognised by its synth.json, which is
    rewritten as incomplete first); refuse any other non-empty directory."""
    if out.exists() and not out.is_dir():
        raise PixelrecError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(out.iterdir())
    foreign = [p.name for p in entries if not _is_synth_output(p.name)]
    if entries and (foreign or not (out / MANIFEST).is_file()):
        raise PixelrecError(f"{out}: not empty and not an earlier synth output (holds "
                            f"{(foreign or [p.name for p in entries])[0]}); give a new or empty directory")
    write_json(out / MANIFEST, {"complete": False})
    for p in entries:
        if p.name != MANIFEST:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _is_synth_output(name: str) -> bool:
    return name in _OUTPUTS or name.startswith((".covers.tmp-", ".covers.lmdb.", ".interactions.csv.",
                                                ".items.csv.", f".{MANIFEST}."))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _appeal(weight: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """[M] in [0, 1]: the item's popularity percentile mixed with noise (strength 1 = popularity alone)."""
    pct = np.argsort(np.argsort(weight)) / max(len(weight) - 1, 1)
    return strength * pct + (1 - strength) * rng.random(len(weight))


def _write_covers(out: Path, item_ids: np.ndarray, item_style: np.ndarray, styles: _Styles, cfg: SynthConfig,
                  rng: np.random.Generator, appeal: np.ndarray | None = None) -> Path:
    """Render every cover into a temporary folder, renamed to covers/ when complete."""
    final, tmp = out / "covers", out / f".covers.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    bar = progress(total=len(item_ids), desc="covers", unit="img")
    k = 0
    for chunk in _render(item_style, styles, cfg.image_size, rng, appeal):
        for pixels in chunk:
            (tmp / f"{item_ids[k]}.jpg").write_bytes(_jpeg_bytes(pixels, cfg.jpeg_quality))
            k += 1
        bar.update(len(chunk))
    bar.close()
    tmp.rename(final)
    return final


def _write_items(path: Path, item_ids: np.ndarray, item_style: np.ndarray, styles: _Styles,
                 rng: np.random.Generator) -> Path:
    n = len(item_ids)
    adjective = np.array(_ADJECTIVES)[rng.integers(0, len(_ADJECTIVES), n)]
    noun = np.array(_NOUNS)[rng.integers(0, len(_NOUNS), n)]
    names = [_style_name(styles, s) for s in range(len(styles.hue))]
    titles = [f"{a} {b}" for a, b in zip(adjective, noun)]
    frame = pd.DataFrame({
        "item_id": item_ids,
        "style": item_style,
        "title": titles,
        "tag": [f"{names[s][0]}-{names[s][1]}" for s in item_style],
        "description": [f"{t.capitalize()}: a {names[s][0]} cover with a {names[s][1]} motif."
                        for t, s in zip(titles, item_style)],
    })
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path
