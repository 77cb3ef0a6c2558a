"""pixelrec: image-based sequential recommendation with an embedding cache.

Stage one (`pixelrec.encode`) runs an open_clip image encoder once over the catalogue's covers
into an HDF5 cache; stage two (`pixelrec.recommend`) trains a light sequence recommender on the
cache (or end to end); `pixelrec.index` serves FAISS retrieval and evaluation.

Every command is also a Python function; the common ones are importable from here (loaded on first
use, so `import pixelrec` stays light):

    import pixelrec
    cfg = pixelrec.FitConfig(interactions="data/interactions.csv", out="runs/id")
    result = pixelrec.fit(cfg)                      # `pixelrec fit`
    report = pixelrec.evaluate("runs/id")           # `pixelrec evaluate` (a dict; format_report prints it)
    recs = pixelrec.retrieve("runs/id", user="u00042", k=5)   # `pixelrec retrieve`
"""

import os as _os

# OpenMP threads that spin while waiting (the default) make torch and FAISS several times slower
# whenever the machine has other work; passive waiting costs little when it has none. Set before
# torch or faiss load their OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# name -> (module, attribute): the public API, imported on first use (PEP 562)
_API = {
    "FitConfig": ("pixelrec.recommend.config", "FitConfig"),
    "fit": ("pixelrec.runs.fit", "fit"),
    "evaluate": ("pixelrec.runs.evaluate", "evaluate_run"),
    "format_report": ("pixelrec.index.report", "format_report"),
    "retrieve": ("pixelrec.runs.retrieve", "retrieve_one"),
    "EncodeConfig": ("pixelrec.encode.pipeline", "EncodeConfig"),
    "EncoderConfig": ("pixelrec.encode.encoder", "EncoderConfig"),
    "encode_images": ("pixelrec.encode.pipeline", "encode_images"),  # (pixelrec.encode is the subpackage)
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pixelrec' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
