"""Shared test setup: quiet progress bars, few threads, and small shared fixtures."""

import os

os.environ.setdefault("PIXELREC_QUIET", "1")

import torch  # noqa: E402

from pixelrec.runtime import set_quiet  # noqa: E402

set_quiet(True)
torch.set_num_threads(min(2, os.cpu_count() or 1))
