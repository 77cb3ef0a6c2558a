"""Is a cached benchmark result still what today's pixelrec would fit? (shared by the benchmark scripts)

The benchmarks cache one result per cell, keyed by what the command line changed (`--set`, epoch
caps). A model's defaults can move between versions (NextItNet's stride, BERT4Rec's lr), and a
result fitted under the old ones would then be reported as today's. `changed_settings` compares the
settings a fit of `cfg` would use (defaults resolved) with those its run directory's config.json
recorded; a non-empty answer means fit again.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

SECTIONS = ("model", "train")  # what a model's defaults set (items/loss come from the command line)
IGNORED = {"train.device", "train.eval_batch_size"}  # where or how fast, not what is trained


def changed_settings(cfg, run_dir: str | Path) -> list[str]:
    """["train.stride: 3 recorded, 1 now", ...] for every setting of `cfg` (a FitConfig, resolved here on a
    copy) that differs from the run's config.json; settings that are null on either side (not read by
    the model) are skipped. A run without a readable config.json -> ["no config.json"]."""
    try:
        recorded = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return ["no config.json"]
    now = copy.deepcopy(cfg)
    now.validate()
    current = now.to_dict()
    changed = []
    for section in SECTIONS:
        for name, value in (recorded.get(section) or {}).items():
            key = f"{section}.{name}"
            if value is None or key in IGNORED or current[section].get(name) is None:
                continue  # not read by the model (then or now: older runs recorded every setting)
            if current[section][name] != value:
                changed.append(f"{key}: {value!r} recorded, {current[section][name]!r} now")
    return changed
