"""Shared test setup: quiet progress bars and one torch thread.

Every test uses tiny models, which run faster (and far steadier on a busy machine) with one
intra-op thread than with several. Both settings hold for the whole session, so helpers call the
public API (e.g. `pixelrec.runs.fit.fit`) directly.

The shared datasets, caches and trained runs are cached builder functions in `fixtures_runs.py`
and `fixtures_images.py` (built once per session, on first use; those modules say why they are
functions rather than fixtures).
"""

import os

os.environ.setdefault("PIXELREC_QUIET", "1")

import torch  # noqa: E402

from pixelrec.runtime import set_quiet  # noqa: E402

set_quiet(True)
torch.set_num_threads(1)
