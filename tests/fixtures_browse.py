"""Runs for the browsing page and cover tests: an id run whose item ids are hostile HTML, with a
folder of covers for `serve --images` / `retrieve --images` (one item left without a cover)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from fixtures_runs import session_root, tiny_config
from pixelrec.runs.fit import fit

HOSTILE = "<img src=x onerror=alert(1)>"  # passes the id rule (no separator): the page must show it as text
AMPERSAND = "a&amp;b'q"
NO_COVER = "w09"  # an item of the hostile run without a cover file


@functools.lru_cache(maxsize=None)
def hostile_run() -> tuple[Path, Path]:
    """(run dir, covers dir): id tower, 40 users over 30 items, two of them with HTML in their ids."""
    root = session_root() / "hostile"
    items = [f"w{i:02d}" for i in range(28)] + [HOSTILE, AMPERSAND]
    rng = np.random.default_rng(3)
    lines = ["user_id,item_id,timestamp"]
    for u in range(40):
        seq = list(rng.choice(len(items), size=6, replace=False))
        if u < 10:
            seq[0] = items.index(HOSTILE)  # in training: warm
        for t, i in enumerate(dict.fromkeys(seq)):
            lines.append(f"u{u:02d},{items[i]},{1000 + t}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text("\n".join(lines) + "\n")
    covers = root / "covers"
    covers.mkdir(exist_ok=True)
    for n, item in enumerate(items):
        if item != NO_COVER:
            colour = (40 + 17 * n, 200 - 13 * n, 90 + 11 * n)
            Image.new("RGB", (32, 24), colour).save(covers / f"{item}.png")
    run = root / "run"
    fit(tiny_config(root / "interactions.csv", run, epochs=2))
    return run, covers
