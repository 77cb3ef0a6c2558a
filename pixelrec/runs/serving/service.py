"""The serving state of one process: the current snapshot, how it is swapped, and additions.

`Service` knows nothing of HTTP. Readers take `service.snapshot` once per batch; a change builds a
whole new `Snapshot` and replaces the reference under a lock, only ever with a newer publication.
Additions are serialised inside the process (a thread lock) and between the processes of
`--workers` (an flock on the run directory), then go through `runs.item_index.add_images_to_run`,
which holds the run's writer lock and publishes a new index version atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ...errors import PixelrecError
from ...runtime import describe_os_error, is_disk_full
from ..item_index import add_images_to_run
from .config import ServeConfig
from .covers import CoverStores
from .engine import Answer, Query, ServeError, answer
from .snapshot import Snapshot, load_snapshot, refresh_snapshot
from .stats import Stats
from .uploads import Cover, remove_stale_upload_dirs, upload_dir, write_covers

_SPACE_WORDS = ("no space left on device", "disk quota exceeded")


@dataclass(frozen=True)
class Addition:
    """What POST /items did."""

    added: dict[str, int]  # item id -> its new index id
    skipped: list[str]  # ids the run already had (their vectors are kept, never replaced)
    failed: dict[str, str] = field(default_factory=dict)  # item id -> why its cover could not be encoded
    snapshot: Snapshot | None = None  # the snapshot that holds them


class Service:
    """A loaded run answering queries, swapping in new publications whole."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.stats = Stats()
        remove_stale_upload_dirs()  # left by a server killed during an upload
        self._snapshot = load_snapshot(config.run_dir, config.device)
        self.covers = CoverStores(config.run_dir, config.images)  # --images is opened (and checked) now
        self._swap_lock = threading.Lock()
        self._add_lock = threading.Lock()

    @property
    def snapshot(self) -> Snapshot:
        """The newest snapshot (an immutable object: hold it for as long as one answer needs it)."""
        return self._snapshot

    def answer(self, queries: Sequence[Query]) -> list[Answer | ServeError]:
        """Answers of `queries`, all from the snapshot current when the call starts."""
        return answer(self._snapshot, queries)

    def refresh(self) -> Snapshot:
        """Follow the manifest: swap in what it names now if that is newer than the current snapshot."""
        return self._install(refresh_snapshot(self._snapshot))

    def _install(self, snapshot: Snapshot) -> Snapshot:
        with self._swap_lock:
            if snapshot.version > self._snapshot.version:
                self._snapshot = snapshot
            return self._snapshot

    def add_covers(self, covers: list[Cover]) -> Addition:
        """Encode `covers` through the run's item tower, publish them, and swap in the snapshot that holds them."""
        if not self._snapshot.has_image_tower:
            raise ServeError(409, f"{self.config.run_dir} is an id run: it has no image tower to encode covers "
                                  f"with (POST /items needs a run trained with --items frozen|partial|e2e|hybrid)")
        with self._add_lock, _run_dir_flock(self.config.run_dir), upload_dir() as tmp:
            try:
                write_covers(covers, tmp)
                before = self.refresh()  # what another worker or process published meanwhile counts as known
                summary = add_images_to_run(self.config.run_dir, str(tmp), device=self.config.device, workers=0)
                after = self.refresh()
            except ServeError:
                raise
            except Exception as error:  # noqa: BLE001 - a full disk is 507 whatever wrote (h5py, torch, faiss, json)
                if _disk_full(error):
                    raise ServeError(507, f"cannot add the covers: no space left on device; nothing was added "
                                          f"(free space on the disk of {self.config.run_dir} or of the temporary "
                                          f"directory and retry)") from None
                if isinstance(error, PixelrecError):
                    raise ServeError(409, f"cannot add the covers: {error}") from None
                if isinstance(error, OSError):
                    raise ServeError(500, f"cannot add the covers: {describe_os_error(error)}") from None
                raise
        self.stats.record_added(summary.added)
        wanted = [c.item_id for c in covers]
        return Addition(added={i: after.items[i] for i in wanted if i in after.items and i not in before.items},
                        skipped=[i for i in wanted if i in before.items], failed=dict(summary.failed),
                        snapshot=after)


def _disk_full(error: BaseException) -> bool:
    """A full disk or quota, whatever wrote (h5py, torch.save, faiss, json), also as pixelrec's own one line."""
    return is_disk_full(error) or any(words in str(error).lower() for words in _SPACE_WORDS)


@contextlib.contextmanager
def _run_dir_flock(run_dir: str) -> Iterator[None]:
    """An exclusive flock on the run directory itself, waited for: one addition at a time across the
    server's worker processes (other pixelrec writers use the run's lock file, not this)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
