"""`verify_cache`: re-read a cache file (complete or unfinished) and check every block."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..errors import PixelrecError
from .cache_format import (BLOCK_DTYPE, _bad_blocks, _committed_blocks, _count_problems, _failure, read_cache_attrs)


@dataclass
class CacheVerification:
    """What `verify_cache` found in one cache file (complete, or an unfinished `<out>.partial`)."""

    path: str
    format_version: int
    complete: bool  # False for an unfinished cache (only its committed blocks are checked)
    n_rows: int  # committed encoded rows
    n_failed: int  # committed failed items
    n_blocks: int  # committed blocks (batches) recorded; 0 for format 1
    checksums: bool  # block checksums were recorded (format 2+); False: only the counts could be checked
    blocks_verified: int  # blocks whose content was re-read and matched its checksum
    problems: list[str] = field(default_factory=list)  # one sentence each; empty when sound
    bad_blocks: list[int] = field(default_factory=list)  # indices of the blocks that do not match
    first_bad_block: Optional[int] = None  # the first of them
    first_bad_rows: Optional[tuple[int, int]] = None  # its rows [start, stop)
    first_bad_items: list[str] = field(default_factory=list)  # up to 3 item ids stored in those rows

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def summary(self) -> str:
        """One line for the command line."""
        counts = f"{self.n_rows} rows, {self.n_failed} failed items"
        state = "" if self.complete else " (unfinished)"
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            items = f", items {', '.join(self.first_bad_items)}" if self.first_bad_items else ""
            fix = ("rebuild it with the same pixelrec encode command and --overwrite" if self.complete else
                   "rerun the same pixelrec encode command: it encodes the damaged blocks again")
            return f"{self.path}{state} is damaged: {self.problems[0]}{items}{more}; {fix}"
        if not self.checksums:
            return (f"{self.path}{state}: counts consistent ({counts}); no checksums were recorded "
                    f"(format {self.format_version}, written before pixelrec kept them), so the content "
                    f"itself cannot be verified")
        return f"{self.path}{state}: OK, {counts} in {self.n_blocks} blocks, every checksum matches"


def verify_cache(path: str | os.PathLike) -> CacheVerification:
    """Re-read a cache file and check it completely: the header's counts against the dataset
    lengths and the block records, then every block's content against its checksum.

    Works on a complete cache or an unfinished `<out>.partial` (whose committed blocks are checked).
    A damaged cache gives a report with `ok` False, its problems and the first bad block's rows and
    item ids; a missing, unreadable or foreign file raises PixelrecError. Caches of format 1 have
    no checksums: the report then has `checksums` False and only the counts are checked.
    """
    path = Path(path)
    if not path.exists():
        raise PixelrecError(f"{path}: embedding cache not found")
    read_cache_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            return _verify_open_file(f, path)
    except (OSError, RuntimeError) as exc:
        raise PixelrecError(f"{path}: cannot be read to verify it ({_failure(exc)[1]})") from None


def _verify_open_file(f: h5py.File, path: Path) -> CacheVerification:
    attrs = f.attrs
    missing = [name for name in ("item_ids", "embeddings", "failed_item_ids", "failed_reasons") if name not in f]
    if missing:
        raise PixelrecError(f"{path}: not a pixelrec embedding cache (no {', '.join(missing)})")
    version = int(attrs["format_version"])
    complete = bool(attrs.get("complete", False))
    checksums = version >= 2 and "blocks" in f
    blocks = _committed_blocks(f) if checksums else np.empty(0, dtype=BLOCK_DTYPE)
    report = CacheVerification(
        path=str(path),
        format_version=version,
        complete=complete,
        n_rows=int(attrs.get("n_rows", 0)),
        n_failed=int(attrs.get("n_failed", 0)),
        n_blocks=len(blocks),
        checksums=checksums,
        blocks_verified=0,
        problems=_count_problems(f, committed_only=not complete),
    )
    if version >= 2 and not checksums:
        report.problems.append("the block records are missing")
    bad = list(_bad_blocks(f, blocks))
    report.blocks_verified = len(blocks) - len(bad)
    report.problems[:0] = [block.reason for block in bad]  # the first damaged rows come first
    report.bad_blocks = [block.index for block in bad]
    if bad:
        report.first_bad_block, report.first_bad_rows = bad[0].index, bad[0].rows
        with contextlib.suppress(OSError, RuntimeError):
            start, stop = bad[0].rows
            report.first_bad_items = list(f["item_ids"].asstr()[start : min(stop, start + 3)])
    return report
