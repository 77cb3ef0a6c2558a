"""Shared test setup: quiet progress bars and one torch thread.

Every test uses tiny models, which run faster (and far steadier on a busy machine) with one
intra-op thread than with several.
"""

import os

os.environ.setdefault("PIXELREC_QUIET", "1")

import torch  # noqa: E402

from pixelrec.runtime import set_quiet  # noqa: E402

set_quiet(True)
torch.set_num_threads(1)
