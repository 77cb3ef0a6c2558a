"""An item index on disk: a directory of four files, each written atomically, read back checked.

    index.faiss        the FAISS index (CPU form), its SHA-256 recorded in index.json
    item_vectors.npy   the raw item vectors [N, d] float32, in insertion order (read memory-mapped)
    item_ids.npy       their vocabulary ids [N] int64
    index.json         spec, metric, dim, ntotal, search parameters, checksum; written last

index.json is written last, so a directory whose writer was killed has no index.json, or the
previous one whose checksum no longer matches, and is refused on reading. Files may come from
elsewhere: no pickle is read, counts, dimensions and ids are checked against each other, and each
failure is a one-line PixelrecError naming the file and how to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import PixelrecError
from ..runtime import atomic_path, file_sha256, write_json
from .faiss_factory import faiss_message, split_ip_to_l2

INDEX_FILE, META_FILE, VECTORS_FILE, IDS_FILE = "index.faiss", "index.json", "item_vectors.npy", "item_ids.npy"
REBUILD_HINT = "rebuild it with `pixelrec index RUN_DIR`"


def write_index_files(directory: Path, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
                      meta: dict[str, Any]) -> None:
    """Write a CPU FAISS `index` with its raw `vectors` and `ids`, then index.json (`meta` plus the
    FAISS version and the index file's size and checksum), each atomically."""
    with atomic_path(directory / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
        digest, size = file_sha256(tmp), tmp.stat().st_size
    _save_npy(directory / VECTORS_FILE, vectors)
    _save_npy(directory / IDS_FILE, ids)
    write_json(directory / META_FILE, {**meta, "faiss_version": faiss.__version__, "index_bytes": size,
                                       "index_sha256": digest})


def read_index_files(directory: Path) -> tuple[faiss.Index, np.ndarray, np.ndarray, dict[str, Any], float | None]:
    """(FAISS index, vectors (memory-mapped), ids, index.json's fields, R of an "IP2L2," index or None)
    of a directory written by `write_index_files`; anything missing, corrupt or inconsistent is a
    PixelrecError."""
    missing = [name for name in (INDEX_FILE, META_FILE, VECTORS_FILE, IDS_FILE) if not (directory / name).is_file()]
    if missing:
        raise PixelrecError(f"{directory}: item index incomplete, missing {', '.join(missing)}; {REBUILD_HINT}")
    meta = _read_meta(directory / META_FILE)
    index = _read_index(directory / INDEX_FILE, meta)
    vectors = _load_npy(directory / VECTORS_FILE, mmap=True)
    ids = _load_npy(directory / IDS_FILE, mmap=False)
    radius = _read_radius(directory / META_FILE, meta)
    _check_consistent(directory, meta, index, vectors, ids, extra=0 if radius is None else 1)
    return index, vectors, ids, meta, radius


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array))


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise PixelrecError(f"{path}: unreadable ({error}); {REBUILD_HINT}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PixelrecError(f"{path}: not valid JSON ({error}); {REBUILD_HINT}") from None
    missing = [key for key in ("spec", "metric", "dim", "ntotal", "index_sha256") if key not in meta]
    if missing:
        raise PixelrecError(f"{path}: missing field(s) {', '.join(missing)}; {REBUILD_HINT}")
    return meta


def _read_index(path: Path, meta: dict[str, Any]) -> faiss.Index:
    if file_sha256(path) != meta["index_sha256"]:
        raise PixelrecError(f"{path}: corrupt or truncated (checksum differs from index.json); {REBUILD_HINT}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise PixelrecError(f"{path}: cannot read the FAISS index ({faiss_message(error)}); {REBUILD_HINT}") from None
    if not isinstance(index, faiss.IndexIDMap):
        raise PixelrecError(f"{path}: not a pixelrec item index (no id map); {REBUILD_HINT}")
    return index


def _read_radius(path: Path, meta: dict[str, Any]) -> float | None:
    """R of an "IP2L2," index from index.json (None for other specs)."""
    if not split_ip_to_l2(str(meta["spec"]))[0]:
        return None
    radius = meta.get("ip2l2_radius")
    if not isinstance(radius, (int, float)) or not np.isfinite(radius) or radius < 0:
        raise PixelrecError(f"{path}: spec {meta['spec']!r} without a valid ip2l2_radius; {REBUILD_HINT}")
    return float(radius)


def _check_consistent(directory: Path, meta: dict[str, Any], index: faiss.Index, vectors: np.ndarray,
                      ids: np.ndarray, extra: int = 0) -> None:
    """Counts and dimensions agree across the files (`extra`: coordinates the FAISS index adds)."""
    sizes = {"index.json ntotal": meta["ntotal"], INDEX_FILE: index.ntotal, VECTORS_FILE: len(vectors),
             IDS_FILE: len(ids)}
    dims = {"index.json dim": meta["dim"], INDEX_FILE: index.d - extra,
            VECTORS_FILE: vectors.shape[1] if vectors.ndim == 2 else None}
    for what, values in (("item counts", sizes), ("dimensions", dims)):
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{name} {value}" for name, value in values.items())
            raise PixelrecError(f"{directory}: inconsistent {what} ({listing}); {REBUILD_HINT}")
    # files from elsewhere: the ids must be usable as table rows, and the ones FAISS answers with
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or (len(ids) and int(ids.min()) < 0) or \
            len(np.unique(ids)) != len(ids) or vectors.dtype.kind != "f":
        raise PixelrecError(f"{directory}: {IDS_FILE} must hold distinct non-negative integer ids and {VECTORS_FILE} "
                            f"floats; {REBUILD_HINT}")
    if not np.array_equal(faiss.vector_to_array(index.id_map), ids):
        raise PixelrecError(f"{directory}: {INDEX_FILE} maps its vectors to other ids than {IDS_FILE}; {REBUILD_HINT}")
