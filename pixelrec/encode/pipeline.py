"""Batch encoding of the catalogue's cover images into the HDF5 cache (`pixelrec encode`).

`encode_images(EncodeConfig)` encodes every item of an image store (or only the items of an
interaction CSV) in sorted id order. DataLoader worker processes decode and preprocess images while
the main process runs the encoder (GPU with pinned memory, non-blocking copies and autocast when
CUDA is there), so decoding hides behind the model. Each batch is appended to `<out>.partial` as
one checksummed block and flushed; a run killed or stopped by a write error (disk full) resumes
after its last intact block, with the same batch boundaries, and ends with the same content as an
uninterrupted run. Images that cannot be loaded are recorded with their reason in the cache, never
dropped silently and never fatal.

A lock file beside the cache (`runtime.lock_path_for(out)`) is held from before the partial file is
read or created until the cache is published, so two processes never write the same cache, even
where HDF5's own file locking is off (HDF5_USE_FILE_LOCKING=FALSE, common on network file systems).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import __version__, distributed
from ..data.ids import shown
from ..data.images import ImageLoadError, ImageStore, open_image_store
from ..data.interactions import load_interactions
from ..distributed import World
from ..errors import PixelrecError
from ..runtime import (FileLock, autocast_dtype, autocast_for, describe_os_error, lock_path_for, log, progress,
                       resolve_device)
from .cache import (
    CacheWriter,
    HeldByFailedWriter,
    UnusablePartial,
    open_cache,
    partial_path,
    read_cache_attrs,
    settings_mismatch,
)
from .encoder import HIDDEN_KINDS, EncoderConfig, ImageEncoder, PixelLoader, build_encoder, random_init_warning
from .shards import (check_no_foreign_shards, find_shards, merge_shards, remove_shards, shard_path, shard_span,
                     shard_world_size)

MISSING = "missing"


@dataclass
class EncodeConfig:
    """Everything `pixelrec encode` needs."""

    images: str  # directory of <item_id>.jpg covers or a PixelRec LMDB
    out: str  # cache path (.h5)
    interactions: Optional[str] = None  # encode only the items of this CSV
    item_ids: Optional[list[str]] = None  # or only these items (e.g. new items for a trained run)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batch_size: int = 64
    num_workers: Optional[int] = None  # decoding processes; None = min(4, CPU count)
    device: str = "auto"
    float32: bool = False  # store float32 instead of float16
    split_block: Optional[int] = None  # also store the tokens entering the last K blocks
    normalize: bool = False  # L2-normalise the embeddings
    skip_missing: bool = False  # items of the CSV without an image: record as failed instead of erroring
    overwrite: bool = False  # replace an existing cache (or partial) made with other settings
    precision: str = "auto"  # CUDA autocast: auto (bf16 where supported, else fp16) | fp32 | bf16 | fp16 (runtime.PRECISIONS)
    follow_symlinks: bool = False  # read covers that are symbolic links to files outside the covers folder
    hidden: Optional[str] = None  # also store per-layer states: cls | cls+mean (encoder.HIDDEN_KINDS)
    taps: str = "all"  # which layers with `hidden`: all | even | a list such as 0,6,12 (encoder.parse_taps)


@dataclass(kw_only=True)
class EncodeSummary:
    """What an encode run did (built with keywords only). Counts are for the whole cache; timing is
    for this run only."""

    out: str
    n_items: int  # catalogue size (encoded + failed)
    n_encoded: int
    n_failed: int
    failed: dict[str, str]  # item id -> reason
    seconds: float
    images_per_s: float
    resumed_from: int  # catalogue positions already done before this run
    already_complete: bool = False  # the cache existed with the same settings; nothing was done
    refused: dict[str, str] = field(default_factory=dict)  # files of the store that cannot be covers -> why


class _CoverDataset(Dataset):
    """Catalogue positions [start, n) -> (position, pixels [3, H, W] or None, failure reason or None)."""

    def __init__(self, loader: PixelLoader, item_ids: list[str], missing: frozenset[int], start: int):
        self.loader = loader
        self.item_ids = item_ids
        self.missing = missing
        self.start = start

    def __len__(self) -> int:
        return len(self.item_ids) - self.start

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        position = self.start + i
        if position in self.missing:
            return position, None, MISSING
        try:
            return position, self.loader(self.item_ids[position]), None
        except ImageLoadError as exc:
            return position, None, exc.reason
        except PixelrecError:
            raise  # the store itself is broken, not this image
        except Exception as exc:  # preprocessing a decodable but unusable image
            return position, None, f"cannot preprocess: {type(exc).__name__}: {exc}"


def _collate(
    samples: list[tuple[int, Optional[torch.Tensor], Optional[str]]],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]], int]:
    """-> (positions of encoded images [b], their pixels [b, 3, H, W], failures [(position, reason)], batch end)."""
    ok = [(position, pixels) for position, pixels, _ in samples if pixels is not None]
    failed = [(position, reason) for position, pixels, reason in samples if pixels is None]
    positions = torch.tensor([position for position, _ in ok], dtype=torch.long)
    pixels = torch.stack([pixels for _, pixels in ok]) if ok else torch.empty(0)
    end = max(position for position, _, _ in samples) + 1
    return positions, pixels, failed, end


def _catalogue(cfg: EncodeConfig, store: ImageStore) -> tuple[list[str], frozenset[int]]:
    """Sorted item ids to encode, and the positions of those without an image in the store."""
    if cfg.interactions is not None and cfg.item_ids is not None:
        raise PixelrecError("give the items to encode as an interactions CSV or as item ids, not both")
    if cfg.interactions is None and cfg.item_ids is None:
        item_ids = store.ids()
        if not item_ids:
            refused = f" ({len(store.refused)} file(s) cannot be covers, e.g. {_first_refused(store)})" \
                if store.refused else ""
            raise PixelrecError(f"{cfg.images}: no images to encode{refused}")
        return item_ids, frozenset()
    if cfg.item_ids is not None:
        item_ids = sorted(set(map(str, cfg.item_ids)))
        if not item_ids:
            raise PixelrecError("no item ids to encode")
        source = "the items asked for"
    else:
        item_ids = sorted(set(load_interactions(cfg.interactions)["item_id"]))
        source = str(cfg.interactions)
    # a refused cover (a FIFO, a link leading outside, ...) is not missing: loading it fails with the reason
    missing = [item_id for item_id in item_ids if item_id not in store and item_id not in store.refused]
    if len(missing) == len(item_ids):
        raise PixelrecError(
            f"none of the {len(item_ids)} items in {source} has an image in {cfg.images} "
            f"(e.g. {', '.join(missing[:3])}); check --images"
        )
    if missing and not cfg.skip_missing:
        raise PixelrecError(
            f"{len(missing)} items in {source} have no image in {cfg.images}, e.g. "
            f"{', '.join(missing[:3])}; pass --skip-missing to record them as failed and continue"
        )
    missing_set = set(missing)
    return item_ids, frozenset(i for i, item_id in enumerate(item_ids) if item_id in missing_set)


def _first_refused(store: ImageStore) -> str:
    name, reason = next(iter(sorted(store.refused.items())))
    return f"{shown(name)}: {reason}"


def _refused(cfg: EncodeConfig, store: ImageStore) -> dict[str, str]:
    """The store's files that cannot be covers, when the catalogue is the whole store (else they are
    either not asked for or fail as items of the catalogue)."""
    return dict(store.refused) if cfg.interactions is None and cfg.item_ids is None else {}


def _arithmetic(cfg: EncodeConfig) -> str:
    """The arithmetic the encoder runs in: fp32, bf16 or fp16 (what --precision means on its device)."""
    dtype = autocast_dtype(resolve_device(cfg.device), cfg.precision)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _cache_attrs(cfg: EncodeConfig, encoder: ImageEncoder, item_ids: list[str], taps: list[int]) -> dict:
    ecfg = encoder.config
    return dict(
        model=ecfg.model,
        pretrained=str(ecfg.pretrained),
        pooling=encoder.pooling,
        preset=ecfg.preset,
        seed=ecfg.seed,
        image_size=encoder.image_size,
        dim=encoder.dim,
        split_block=cfg.split_block or 0,
        hidden=cfg.hidden or "",
        hidden_taps=json.dumps(taps) if cfg.hidden else "",
        hidden_widths=json.dumps(encoder.tap_widths(taps, cfg.hidden)) if cfg.hidden else "",
        hidden_tap_range=len(encoder.tap_range()) if cfg.hidden else 0,
        embedding_dtype="float32" if cfg.float32 else "float16",
        precision=_arithmetic(cfg),
        normalized=bool(cfg.normalize),
        weights_sha256=encoder.weights_sha256(),
        items_sha256=hashlib.sha256("\n".join(item_ids).encode("utf-8")).hexdigest(),
        n_catalogue=len(item_ids),
        model_config=encoder.model_config_json,
        preprocess=json.dumps(encoder.preprocess_cfg, sort_keys=True),
        images=str(cfg.images),
        interactions=str(cfg.interactions or ""),
        pixelrec_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _validate(cfg: EncodeConfig) -> None:
    if cfg.batch_size < 1:
        raise PixelrecError(f"--batch-size {cfg.batch_size}: expected a positive integer")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise PixelrecError(f"--workers {cfg.num_workers}: expected 0 or more")
    if cfg.split_block is not None and cfg.split_block < 1:
        raise PixelrecError(f"--split-block {cfg.split_block}: expected a positive number of blocks")
    if cfg.hidden is not None and cfg.hidden not in HIDDEN_KINDS:
        raise PixelrecError(f"--hidden {cfg.hidden}: expected one of {', '.join(HIDDEN_KINDS)}")
    if cfg.hidden is None and cfg.taps != "all":
        raise PixelrecError(f"--taps {cfg.taps} chooses the layers of --hidden; give --hidden cls (or cls+mean) too")


@contextlib.contextmanager
def _cache_lock(out: Path) -> Iterator[FileLock]:
    """Hold the lock file of `out` for the whole encode; fails at once while another process holds it."""
    lock = FileLock(lock_path_for(out), f"the cache {out}")
    try:
        lock.acquire()
    except OSError as exc:
        raise PixelrecError(f"cannot lock the cache {out}: {describe_os_error(exc)}") from None
    try:
        yield lock
    finally:
        lock.release()


@dataclass
class _Plan:
    """What one encode run does, decided under the cache lock."""

    cfg: EncodeConfig
    store: ImageStore
    encoder: ImageEncoder
    device: torch.device
    item_ids: list[str]  # the catalogue, sorted
    missing: frozenset[int]  # catalogue positions without an image
    attrs: dict  # the cache's header
    taps: list[int]  # the taps stored with --hidden ([] without)
    start: Optional[int]  # first catalogue position to encode; None: `out` is already complete


def _plan(cfg: EncodeConfig, encoder: Optional[ImageEncoder], resume: bool = True) -> _Plan:
    """Read the catalogue, build the encoder and find where to start (see `_resume_point`; with
    resume=False the plan starts at 0 and `out` is not looked at)."""
    store = open_image_store(cfg.images, cfg.follow_symlinks)
    item_ids, missing = _catalogue(cfg, store)
    device = resolve_device(cfg.device)
    encoder = build_encoder(cfg.encoder, device) if encoder is None else encoder.to(device).eval()
    if cfg.split_block is not None:
        encoder.check_split(cfg.split_block)
    if cfg.hidden and not isinstance(encoder, ImageEncoder):
        raise PixelrecError("--hidden stores an image encoder's per-layer states; a run's item tower "
                            "(--from-run) has none")
    taps = encoder.parse_taps(cfg.taps) if cfg.hidden else []
    attrs = _cache_attrs(cfg, encoder, item_ids, taps)
    start = _resume_point(cfg, attrs) if resume else 0
    return _Plan(cfg, store, encoder, device, item_ids, missing, attrs, taps, start=start)


def _resume_point(cfg: EncodeConfig, attrs: dict) -> Optional[int]:
    """Catalogue position to start from (0 = a fresh cache); None when `out` is already complete.

    An existing cache or partial made with other settings is refused by name unless --overwrite.
    """
    out = Path(cfg.out)
    partial = partial_path(out)
    advice = "; use --overwrite or another --out"
    if cfg.overwrite:
        return 0
    if out.exists():
        have = read_cache_attrs(out, advice)
        if not have.get("complete"):
            raise PixelrecError(f"{out} exists and is not a complete pixelrec cache{advice}")
        problem = settings_mismatch(out, have, attrs)
        if problem:
            raise PixelrecError(problem + advice)
        return None
    if partial.exists():
        return _resume_partial(cfg, attrs, advice)
    return 0


def _resume_partial(cfg: EncodeConfig, attrs: dict, advice: str) -> int:
    """Where to continue `<out>.partial`: after its last committed block that passes its checksum.

    A partial file that cannot be resumed (unreadable, or from a pixelrec without block checksums)
    is started again from the first item, with a log line.
    """
    partial = partial_path(cfg.out)
    try:
        have = read_cache_attrs(partial)
    except HeldByFailedWriter:
        raise
    except PixelrecError as exc:
        log(f"cannot resume: {exc}; starting again from the first item")
        return 0
    problem = settings_mismatch(partial, have, attrs)
    if problem:
        raise PixelrecError(problem + advice)
    try:
        writer = CacheWriter.resume(cfg.out)
    except UnusablePartial as exc:
        log(f"{partial}: cannot resume ({exc.reason}); starting again from the first item")
        return 0
    start = writer.positions_done
    writer.close()
    return start


def _open_writer(plan: _Plan) -> CacheWriter:
    if plan.start:
        # verified under this lock moments ago; appended to in a fresh copy of its good blocks
        return CacheWriter.resume(plan.cfg.out, verify=False, fresh=True)
    k = plan.cfg.split_block
    return CacheWriter.create(
        plan.cfg.out,
        plan.attrs,
        dim=plan.encoder.dim,
        embedding_dtype=np.dtype(np.float32 if plan.cfg.float32 else np.float16),
        token_shape=plan.encoder.token_shape(k) if k else None,
        top_blocks=plan.encoder.top_blocks(k) if k else None,
        hidden_shape=(len(plan.taps), max(json.loads(plan.attrs["hidden_widths"]))) if plan.cfg.hidden else None,
    )


def _forget_inherited_lock(lock_file: tuple[int, int, int], worker_id: int) -> None:
    """DataLoader worker init: close the inherited descriptor of the cache lock, so that a worker
    outliving a killed main process does not keep the lock held. The lock stays with the main process."""
    fd, device, inode = lock_file
    with contextlib.suppress(OSError):
        found = os.fstat(fd)
        if (found.st_dev, found.st_ino) == (device, inode):  # the same file, not a reused number
            os.close(fd)


def _loader(plan: _Plan, lock: FileLock) -> DataLoader:
    """Batches of (positions, pixels, failures, batch end) from plan.start on, decoded in workers."""
    cfg = plan.cfg
    workers = min(4, os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
    init = None
    fd = lock.fileno()
    if workers and fd is not None:
        found = os.fstat(fd)
        init = functools.partial(_forget_inherited_lock, (fd, found.st_dev, found.st_ino))
    return DataLoader(
        _CoverDataset(plan.encoder.pixel_loader(plan.store), plan.item_ids, plan.missing, plan.start or 0),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=plan.device.type == "cuda",
        worker_init_fn=init,
    )


def _encode_batch(plan: _Plan, pixels: torch.Tensor
                  ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Pixels [b, 3, H, W] -> (embeddings [b, E], tokens [b, T, W] or None, per-layer states
    [b, taps, W] or None) in the cache's dtype."""
    cfg, encoder = plan.cfg, plan.encoder
    embedding_dtype = np.float32 if cfg.float32 else np.float16
    if pixels.numel() == 0:  # every image of the batch failed
        return np.empty((0, encoder.dim), dtype=embedding_dtype), None, None
    hidden = None
    with torch.inference_mode(), autocast_for(plan.device, cfg.precision):
        x = pixels.to(plan.device, non_blocking=True)
        if cfg.hidden:  # the same forward pass gives the pooled output, the tokens and the taps
            pooled, tokens, hidden = encoder.forward_hidden(x, plan.taps, cfg.hidden, cfg.split_block)
        elif cfg.split_block:
            pooled, tokens = encoder.forward_split(x, cfg.split_block)  # [b, E], [b, T, W]
        else:
            pooled, tokens = encoder(x), None  # [b, E]
    pooled = pooled.float()
    if cfg.normalize:
        pooled = F.normalize(pooled, dim=-1)
    if tokens is not None:
        tokens = tokens.to(torch.float32 if cfg.float32 else torch.float16).cpu().numpy()
    if hidden is not None:
        hidden = hidden.to(torch.float32 if cfg.float32 else torch.float16).cpu().numpy()
    return pooled.cpu().numpy().astype(embedding_dtype), tokens, hidden


def _encode_batches(plan: _Plan, batches: Iterable, writer: CacheWriter) -> None:
    """The batch loop: encode each batch the loader yields and commit it as one block, in order."""
    ids = plan.item_ids
    done = plan.start or 0
    with progress(total=len(ids), initial=done, unit="img", desc=f"encode {Path(plan.cfg.out).name}") as bar:
        for positions, pixels, failures, end in batches:
            embeddings, tokens, hidden = _encode_batch(plan, pixels)
            writer.append(
                [ids[p] for p in positions.tolist()],
                embeddings,
                tokens,
                [(ids[p], reason) for p, reason in failures],
                positions_done=end,
                hidden=hidden,
            )
            bar.update(end - done)
            done = end


@dataclass
class _Written:
    seconds: float  # the batch loop's time
    n_encoded: int
    failed: dict[str, str]


def _write_cache(plan: _Plan, lock: FileLock) -> _Written:
    """Encode from plan.start to the end into `<out>.partial`, then publish it as `out`."""
    if plan.start:
        log(f"resuming {partial_path(plan.cfg.out)}: {plan.start} of {len(plan.item_ids)} items already done")
    started = time.perf_counter()
    # Fork the workers before the cache file is opened: a worker holding its descriptor would keep
    # HDF5's file lock alive after the main process is killed and block the rerun that resumes it.
    batches = iter(_loader(plan, lock))
    writer: Optional[CacheWriter] = None
    try:
        writer = _open_writer(plan)
        _encode_batches(plan, batches, writer)
        seconds = time.perf_counter() - started
        written = _Written(seconds=seconds, n_encoded=writer.n_rows, failed=writer.failed())
        writer.finish()
    finally:
        del batches  # shuts the workers down
        if writer is not None:
            writer.close()
    return written


def _already_complete(out: Path) -> EncodeSummary:
    with open_cache(out) as cache:
        failed, n_encoded = cache.failed, len(cache)
    log(f"{out} is already complete ({n_encoded} items encoded, {len(failed)} failed); nothing to do")
    n_items = n_encoded + len(failed)
    return EncodeSummary(out=str(out), n_items=n_items, n_encoded=n_encoded, n_failed=len(failed), failed=failed,
                         seconds=0.0, images_per_s=0.0, resumed_from=n_items, already_complete=True)


def _summary(plan: _Plan, written: _Written) -> EncodeSummary:
    n, start, failed = len(plan.item_ids), plan.start or 0, written.failed
    if failed:
        example = next(iter(failed.items()))
        log(f"{len(failed)} of {n} items could not be encoded (listed in {plan.cfg.out}), "
            f"e.g. {example[0]}: {example[1]}")
    return EncodeSummary(
        out=str(plan.cfg.out),
        n_items=n,
        n_encoded=written.n_encoded,
        n_failed=len(failed),
        failed=failed,
        seconds=written.seconds,
        images_per_s=(n - start) / written.seconds if written.seconds > 0 else 0.0,
        resumed_from=start,
    )


def encode_images(cfg: EncodeConfig, encoder: Optional[ImageEncoder] = None,
                  world: Optional[World] = None) -> EncodeSummary:
    """Encode the catalogue's covers into `cfg.out` (resuming an interrupted run); see the module doc.

    `encoder` replaces the one `cfg.encoder` describes (e.g. a tuned encoder; it is moved to the
    device and put in eval mode); the cache records its config and weight fingerprint either way.
    Holds the lock file of `cfg.out` throughout; a second encode of the same cache fails at once.
    Under torchrun (`world` None: read from the environment) the ranks encode shards of the
    catalogue and rank 0 merges them into the same cache one process writes (`encode.shards`).
    """
    _validate(cfg)
    world = distributed.init(cfg.device) if world is None else world
    warning = random_init_warning(cfg.encoder.model, cfg.encoder.pretrained) if encoder is None else None
    if warning and world.is_main and cfg.encoder.preset != "pixelrec":  # the preset prints its own
        log(warning)
    if world.is_distributed:
        return _encode_sharded(cfg, encoder, world)
    with _cache_lock(Path(cfg.out)) as lock:
        plan = _plan(cfg, encoder)
        shards = find_shards(cfg.out)
        if shards and cfg.overwrite:
            remove_shards(shards)
            shards = []
        if plan.start is None:
            summary = _already_complete(Path(cfg.out))
        elif plan.start == 0 and shards:
            summary = _finish_shards(plan, shards)
        else:
            summary = _summary(plan, _write_cache(plan, lock))
        remove_shards(shards)  # a merged cache makes them useless (killed after a merge, or resumed here)
    summary.refused = _refused(cfg, plan.store)
    return summary


def _shard_config(cfg: EncodeConfig, item_ids: list[str], rank: int, size: int, device: str) -> EncodeConfig:
    """What rank `rank` of `size` encodes: its span of the catalogue into its own shard cache."""
    lo, hi = shard_span(len(item_ids), cfg.batch_size, rank, size)
    return dataclasses.replace(cfg, out=str(shard_path(cfg.out, rank, size)), interactions=None,
                               item_ids=item_ids[lo:hi], skip_missing=True, device=device)


def _finish_shards(plan: _Plan, shards: list[Path]) -> EncodeSummary:
    """One process finishing the shards of an interrupted sharded encode: each shard is resumed (or
    refused by name when made with other settings), then they are merged as the ranks would have."""
    cfg, size = plan.cfg, shard_world_size(shards)
    log(f"{cfg.out}: resuming the shards of a {size}-rank encode in this process")
    started = time.perf_counter()
    parts, paths = [], []
    for rank in range(size):
        mine = _shard_config(cfg, plan.item_ids, rank, size, str(plan.device))
        parts.append(_encode_shard(mine, plan.encoder, len(mine.item_ids)))
        if mine.item_ids:
            paths.append(Path(mine.out))
    seconds = time.perf_counter() - started
    merge_shards(cfg.out, paths, plan.item_ids, plan.attrs, cfg.batch_size)
    remove_shards(paths)  # including those of ranks that had not started
    return _sharded_summary(cfg.out, len(plan.item_ids), parts, seconds)


def _encode_sharded(cfg: EncodeConfig, encoder: Optional[ImageEncoder], world: World) -> EncodeSummary:
    """Every rank encodes its shard (resumable), then rank 0 merges them into `cfg.out`."""
    out = Path(cfg.out)
    world.check_same("encode settings", dataclasses.asdict(cfg))
    lock = FileLock(lock_path_for(out), f"the cache {out}")
    world.on_main(lambda: _claim_output(lock, out, world.size))
    try:
        device = world.device(cfg.device)
        plan = world.agree(lambda: _plan(dataclasses.replace(cfg, device=str(device)), encoder, resume=False))
        complete = world.on_main(lambda: out.exists() and _resume_point(cfg, plan.attrs) is None)
        if complete:
            return world.on_main(lambda: _already_complete(out))
        spans = [shard_span(len(plan.item_ids), cfg.batch_size, r, world.size) for r in range(world.size)]
        shards = [shard_path(out, r, world.size) for r, (lo, hi) in enumerate(spans) if hi > lo]
        mine = _shard_config(cfg, plan.item_ids, world.rank, world.size, str(device))
        started = time.perf_counter()
        parts = world.gather(world.agree(lambda: _encode_shard(mine, plan.encoder, len(mine.item_ids))))
        seconds = time.perf_counter() - started
        world.on_main(lambda: merge_shards(out, shards, plan.item_ids, plan.attrs, cfg.batch_size))
        world.on_main(lambda: remove_shards(shards))
    finally:
        if world.is_main:
            lock.release()
    summary = _sharded_summary(out, len(plan.item_ids), parts, seconds)
    summary.refused = _refused(cfg, plan.store)
    return summary


def _sharded_summary(out: str | Path, n: int, parts: list[EncodeSummary], seconds: float) -> EncodeSummary:
    failed = {item: reason for part in parts for item, reason in part.failed.items()}
    resumed = sum(part.resumed_from for part in parts)
    return EncodeSummary(out=str(out), n_items=n, n_encoded=sum(part.n_encoded for part in parts),
                         n_failed=len(failed), failed=failed, seconds=seconds,
                         images_per_s=(n - resumed) / seconds if seconds > 0 else 0.0, resumed_from=resumed)


def _claim_output(lock: FileLock, out: Path, size: int) -> None:
    try:
        lock.acquire()
    except OSError as exc:
        raise PixelrecError(f"cannot lock the cache {out}: {describe_os_error(exc)}") from None
    check_no_foreign_shards(out, size)


def _encode_shard(cfg: EncodeConfig, encoder: ImageEncoder, n: int) -> EncodeSummary:
    """One rank's shard, encoded like any cache (a rank with no items has an empty summary)."""
    if n == 0:
        return EncodeSummary(out=cfg.out, n_items=0, n_encoded=0, n_failed=0, failed={}, seconds=0.0,
                             images_per_s=0.0, resumed_from=0)
    return encode_images(cfg, encoder, world=World())
