"""pixelrec: image-based sequential recommendation with an embedding cache.

Stage one (`pixelrec.encode`) runs an open_clip image encoder once over the catalogue's covers
into an HDF5 cache; stage two (`pixelrec.recommend`) trains a light sequence recommender on the
cache (or end to end); `pixelrec.index` serves FAISS retrieval and evaluation.
"""

import os as _os

# OpenMP threads that spin while waiting (the default) make torch and FAISS several times slower
# whenever the machine has other work; passive waiting costs little when it has none. Set before
# torch or faiss load their OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
