"""pixelrec: image-based sequential recommendation with an embedding cache.

Stage one (`pixelrec.encode`) runs an open_clip image encoder once over the catalogue's covers
into an HDF5 cache; stage two (`pixelrec.recommend`) trains a light sequence recommender on the
cache (or end to end); `pixelrec.index` serves FAISS retrieval and evaluation.
"""

__version__ = "0.1.0"
