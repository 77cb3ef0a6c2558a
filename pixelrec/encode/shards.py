"""Sharded encoding (`torchrun ... -m pixelrec encode`): one resumable shard cache per rank, merged
into the one cache a single process would write.

The catalogue is cut at multiples of the batch size, so every rank encodes exactly the batches a
single process would encode (the same images together, hence the same numbers), into its own cache
`OUT.shard-R-of-W` (resumable like any cache). When every shard is complete, rank 0 copies them into
`OUT`, block by block in catalogue order with the same block boundaries as a one-process encode,
publishes it the usual way (fsync, verify every block, rename) and removes the shards.

A one-process rerun of an interrupted sharded encode (`find_shards`) resumes every shard in turn
and merges them the same way; a rerun that finds the cache complete removes the leftover shards.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np

from ..errors import PixelrecError
from ..runtime import FileLock, lock_path_for
from .cache import CacheWriter, EmbeddingCache, open_cache, partial_path

_SHARD = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def shard_path(out: str | Path, rank: int, size: int) -> Path:
    """The shard cache rank `rank` of `size` writes for `out`."""
    return Path(f"{out}.shard-{rank}-of-{size}")


def shard_span(n: int, batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s catalogue positions [lo, hi): a contiguous run of whole batches."""
    batches = -(-n // batch_size)
    first, last = batches * rank // size, batches * (rank + 1) // size
    return min(first * batch_size, n), min(last * batch_size, n)


def check_no_foreign_shards(out: str | Path, size: int) -> None:
    """Refuse to start when shards of an encode with another number of ranks are in the way."""
    out = Path(out)
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.shard-*")):
        name = path.name[: -len(".partial")] if path.name.endswith(".partial") else path.name
        match = _SHARD.search(name)
        if match and int(match.group(2)) != size:
            raise PixelrecError(f"{path}: a shard of an encode with {match.group(2)} ranks is in the way of this one "
                                f"with {size}; finish that encode with {match.group(2)} ranks, or delete its shards")


def find_shards(out: str | Path) -> list[Path]:
    """The shard caches (complete or partial) of an interrupted sharded encode of `out`, named
    without `.partial`; refused by name when shards of encodes with different numbers of ranks mix."""
    out = Path(out)
    found: dict[int, set[Path]] = {}
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.shard-*")):
        name = path.name[: -len(".partial")] if path.name.endswith(".partial") else path.name
        match = _SHARD.fullmatch(name[len(out.name):])
        if match:
            found.setdefault(int(match.group(2)), set()).add(path.parent / name)
    if len(found) > 1:
        sizes = sorted(found)
        raise PixelrecError(f"{out}: shards of encodes with {' and '.join(map(str, sizes))} ranks are in the way "
                            f"(e.g. {min(found[sizes[-1]])}); delete the ones you do not want to resume")
    return sorted(next(iter(found.values()), ()))


def shard_world_size(shards: list[Path]) -> int:
    """The number of ranks the shards `shards` (from `find_shards`) were written by."""
    return int(_SHARD.search(shards[0].name).group(2))


def merge_shards(out: str | Path, shards: list[Path], item_ids: list[str], attrs: dict, batch_size: int) -> None:
    """Write the complete cache `out` from the ranks' complete shard caches (in rank order)."""
    opened = [open_cache(path) for path in shards]
    try:
        first = opened[0]
        writer = CacheWriter.create(out, attrs, dim=first.dim, embedding_dtype=np.dtype(first.embedding_dtype),
                                    token_shape=first.token_shape,
                                    top_blocks=first.top_blocks() if first.has_tokens else None,
                                    hidden_shape=first.hidden_shape)
        try:
            _copy_blocks(writer, opened, item_ids, batch_size)
            writer.finish()
        finally:
            writer.close()
    finally:
        for cache in opened:
            cache.close()


def _copy_blocks(writer: CacheWriter, shards: list[EmbeddingCache], item_ids: list[str], batch_size: int) -> None:
    """Append the shards' rows and failures in blocks of `batch_size` catalogue positions."""
    position = {item: p for p, item in enumerate(item_ids)}
    rows = [(position[str(item)], s, r) for s, cache in enumerate(shards) for r, item in enumerate(cache.item_ids)]
    failures = [(position[item], item, reason) for cache in shards for item, reason in cache.failed.items()]
    if len(rows) + len(failures) != len(item_ids):
        raise PixelrecError(f"{writer.out}: the shards hold {len(rows) + len(failures)} of the "
                            f"{len(item_ids)} catalogue items; rerun the same command to finish them")
    rows.sort()
    failures.sort()
    r = f = 0
    for start in range(0, len(item_ids), batch_size):
        end = min(start + batch_size, len(item_ids))
        block_rows = []
        while r < len(rows) and rows[r][0] < end:
            block_rows.append(rows[r])
            r += 1
        block_failed = []
        while f < len(failures) and failures[f][0] < end:
            block_failed.append(failures[f][1:])
            f += 1
        ids, embeddings, tokens, hidden = _read_rows(shards, block_rows, item_ids)
        writer.append(ids, embeddings, tokens, block_failed, positions_done=end, hidden=hidden)


def _read_rows(shards: list[EmbeddingCache], rows: list[tuple[int, int, int]], item_ids: list[str]):
    """(item ids, embeddings, tokens or None, per-layer states or None) of (position, shard, row)
    triples, in their order."""
    first = shards[0]
    if not rows:
        return [], np.empty((0, first.dim), dtype=first.embedding_dtype), None, None
    embeddings, tokens, hidden = [], [], []
    for s in sorted({shard for _, shard, _ in rows}):
        picked = np.array([row for _, shard, row in rows if shard == s], dtype=np.int64)
        embeddings.append(shards[s].read_embeddings(picked).astype(first.embedding_dtype))
        if first.has_tokens:
            tokens.append(shards[s].read_tokens(picked))
        if first.has_hidden:
            hidden.append(shards[s].read_hidden(picked))
    ids = [item_ids[p] for p, _, _ in rows]
    return (ids, np.concatenate(embeddings), np.concatenate(tokens) if first.has_tokens else None,
            np.concatenate(hidden) if first.has_hidden else None)


def remove_shards(shards: list[Path]) -> None:
    """Delete shard caches, their partial files and the lock files killed ranks left behind."""
    for path in shards:
        path.unlink(missing_ok=True)
        partial_path(path).unlink(missing_ok=True)
        lock = lock_path_for(path)
        if lock.exists():
            try:  # taking the lock proves its holder is gone; releasing removes the file
                FileLock(lock, f"the shard {path}").acquire().release()
            except PixelrecError:
                pass  # held by a live process: leave it
