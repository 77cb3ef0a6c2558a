"""Write covers as a PixelRec LMDB image store (the format of PixelRec's `generate_lmdb.py`).

pixelrec only reads such stores (`data.images.LmdbImageStore`); this writer exists for `pixelrec
synth --lmdb` and for tests, so that the reader is checked against byte-level PixelRec records.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np

from ..errors import PixelrecError
from ..runtime import atomic_path


_RECORD_HEADER = b"\x80\x03c__main__\nLMDB_Image\n)\x81"  # PROTO 3, GLOBAL, EMPTY_TUPLE, NEWOBJ


def encode_pixelrec_record(item_id: str, image: np.ndarray) -> bytes:
    """The pickle PixelRec's script stores for one image: `__main__.LMDB_Image` with attributes
    channels, size, image (uint8 bytes), id. Built by hand because that class lives in the
    script's `__main__`, which the standard pickler would insist on importing."""
    arr = np.ascontiguousarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise PixelrecError(f"item {item_id}: expected a uint8 HxWxC array with C in 1, 3, 4; "
                            f"got {arr.dtype} {arr.shape}")
    state = {"channels": int(arr.shape[2]), "size": (int(arr.shape[0]), int(arr.shape[1])),
             "image": arr.tobytes(), "id": str(item_id)}
    body = pickle.dumps(state, protocol=3)[2:-1]  # the dict's opcodes, without PROTO and STOP
    return _RECORD_HEADER + body + b"b."  # BUILD, STOP


def write_pixelrec_lmdb(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]],
                        commit_every: int = 1000) -> int:
    """Write (item_id, uint8 HxWxC array) pairs as a PixelRec LMDB; returns the number written.

    Like PixelRec's script, an existing directory gets `data.mdb` inside it; any other path
    becomes a single-file LMDB, written under a temporary name and renamed when complete.
    Ids must be ASCII and unique. `__keys__` and `__len__` are written last.
    """
    path = Path(path)
    if path.is_dir():
        return _write_lmdb(path, items, subdir=True, commit_every=commit_every)
    with atomic_path(path) as tmp:
        return _write_lmdb(tmp, items, subdir=False, commit_every=commit_every)


def _write_lmdb(path: Path, items: Iterable[tuple[str, np.ndarray]], subdir: bool, commit_every: int) -> int:
    env = lmdb.open(str(path), subdir=subdir, map_size=64 << 20, lock=False, meminit=False)
    keys: list[bytes] = []
    seen: set[bytes] = set()
    batch: list[tuple[bytes, bytes]] = []
    try:
        for item_id, image in items:
            key = _ascii_key(item_id)
            if key in seen:
                raise PixelrecError(f"item {item_id}: given twice to write_pixelrec_lmdb")
            seen.add(key)
            keys.append(key)
            batch.append((key, encode_pixelrec_record(item_id, image)))
            if len(batch) >= commit_every:
                _put_all(env, batch)
                batch = []
        batch += [(b"__keys__", pickle.dumps(keys, protocol=3)), (b"__len__", pickle.dumps(len(keys), protocol=3))]
        _put_all(env, batch)
        env.sync()
    finally:
        env.close()
    return len(keys)


def _ascii_key(item_id: str) -> bytes:
    try:
        return str(item_id).encode("ascii")
    except UnicodeEncodeError:
        raise PixelrecError(f"item {item_id}: LMDB keys must be ASCII item ids") from None


def _put_all(env: lmdb.Environment, batch: list[tuple[bytes, bytes]]) -> None:
    """Write one batch in one transaction, doubling the map size until it fits."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in batch:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
