"""Batch encoding of the catalogue's cover images into the HDF5 cache (SPEC §4 `encode`, §5, §9).

`encode_images(EncodeConfig)` encodes every item of an image store (or only the items of an
interaction CSV) in sorted id order. DataLoader worker processes decode and preprocess images while
the main process runs the encoder (GPU with pinned memory, non-blocking copies and autocast when
CUDA is there), so decoding hides behind the model. Each batch is appended to `<out>.partial` and
flushed; a killed run resumes at the first unfinished batch, with the same batch boundaries, and
ends with the same content as an uninterrupted run. Images that cannot be loaded are recorded with
their reason in the cache, never dropped silently and never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..data.images import ImageLoadError, ImageStore, open_image_store
from ..data.interactions import load_interactions
from ..errors import PixelrecError
from ..runtime import log, progress, resolve_device
from .cache import CacheWriter, open_cache, partial_path, read_cache_attrs, settings_mismatch
from .encoder import EncoderConfig, ImageEncoder, PixelLoader, build_encoder

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
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16)


@dataclass
class EncodeSummary:
    """What an encode run did. Counts are for the whole cache; timing is for this run only."""

    out: str
    n_items: int  # catalogue size (encoded + failed)
    n_encoded: int
    n_failed: int
    failed: dict[str, str]  # item id -> reason
    seconds: float
    images_per_s: float
    resumed_from: int  # catalogue positions already done before this run
    already_complete: bool = False  # the cache existed with the same settings; nothing was done


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
            raise PixelrecError(f"{cfg.images}: no images to encode")
        return item_ids, frozenset()
    if cfg.item_ids is not None:
        item_ids = sorted(set(map(str, cfg.item_ids)))
        if not item_ids:
            raise PixelrecError("no item ids to encode")
        source = "the items asked for"
    else:
        item_ids = sorted(set(load_interactions(cfg.interactions)["item_id"]))
        source = str(cfg.interactions)
    missing = [item_id for item_id in item_ids if item_id not in store]
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


def _cache_attrs(cfg: EncodeConfig, encoder: ImageEncoder, item_ids: list[str]) -> dict:
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
        embedding_dtype="float32" if cfg.float32 else "float16",
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
        have = read_cache_attrs(partial, advice)
        problem = settings_mismatch(partial, have, attrs)
        if problem:
            raise PixelrecError(problem + advice)
        return int(have["positions_done"])
    return 0


def _open_writer(cfg: EncodeConfig, attrs: dict, encoder: ImageEncoder, start: int) -> CacheWriter:
    if start:
        return CacheWriter.resume(cfg.out)
    k = cfg.split_block
    return CacheWriter.create(
        cfg.out,
        attrs,
        dim=encoder.dim,
        embedding_dtype=np.dtype(np.float32 if cfg.float32 else np.float16),
        token_shape=(encoder.num_tokens, encoder.width) if k else None,
        top_blocks=encoder.top_blocks(k) if k else None,
    )


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _validate(cfg: EncodeConfig) -> None:
    if cfg.batch_size < 1:
        raise PixelrecError(f"--batch-size {cfg.batch_size}: expected a positive integer")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise PixelrecError(f"--workers {cfg.num_workers}: expected 0 or more")
    if cfg.split_block is not None and cfg.split_block < 1:
        raise PixelrecError(f"--split-block {cfg.split_block}: expected a positive number of blocks")


def encode_images(cfg: EncodeConfig, encoder: Optional[ImageEncoder] = None) -> EncodeSummary:
    """Encode the catalogue's covers into `cfg.out` (resuming an interrupted run); see the module doc.

    `encoder` replaces the one `cfg.encoder` describes (e.g. a tuned encoder; it is moved to the
    device and put in eval mode); the cache records its config and weight fingerprint either way.
    """
    _validate(cfg)
    out = Path(cfg.out)
    store = open_image_store(cfg.images)
    item_ids, missing = _catalogue(cfg, store)
    device = resolve_device(cfg.device)
    encoder = build_encoder(cfg.encoder, device) if encoder is None else encoder.to(device).eval()
    if cfg.split_block is not None:
        encoder.check_split(cfg.split_block)
    attrs = _cache_attrs(cfg, encoder, item_ids)
    start = _resume_point(cfg, attrs)
    if start is None:
        with open_cache(out) as cache:
            failed = cache.failed
            log(f"{out} is already complete ({len(cache)} items encoded, {len(failed)} failed); nothing to do")
            return EncodeSummary(str(out), len(cache) + len(failed), len(cache), len(failed), failed, 0.0, 0.0,
                                 len(cache) + len(failed), already_complete=True)

    n = len(item_ids)
    if start:
        log(f"resuming {partial_path(out)}: {start} of {n} items already done")
    workers = min(4, os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
    loader = DataLoader(
        _CoverDataset(encoder.pixel_loader(store), item_ids, missing, start),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    # Fork the workers before the cache file is opened: a worker holding its descriptor would keep
    # HDF5's file lock alive after the main process is killed and block the rerun that resumes it.
    embedding_dtype = np.float32 if cfg.float32 else np.float16
    token_dtype = torch.float32 if cfg.float32 else torch.float16
    started = time.perf_counter()
    batches = iter(loader)
    writer: Optional[CacheWriter] = None
    done = start
    try:
        writer = _open_writer(cfg, attrs, encoder, start)
        with progress(total=n, initial=start, unit="img", desc=f"encode {out.name}") as bar:
            for positions, pixels, failures, end in batches:
                tokens = None
                if len(positions):
                    with torch.inference_mode(), _autocast(device, cfg.amp):
                        x = pixels.to(device, non_blocking=True)  # [b, 3, H, W]
                        if cfg.split_block:
                            pooled, tokens = encoder.forward_split(x, cfg.split_block)  # [b, E], [b, T, W]
                        else:
                            pooled = encoder(x)  # [b, E]
                    pooled = pooled.float()
                    if cfg.normalize:
                        pooled = F.normalize(pooled, dim=-1)
                    embeddings = pooled.cpu().numpy().astype(embedding_dtype)
                    if tokens is not None:
                        tokens = tokens.to(token_dtype).cpu().numpy()
                else:
                    embeddings = np.empty((0, encoder.dim), dtype=embedding_dtype)
                writer.append(
                    [item_ids[p] for p in positions.tolist()],
                    embeddings,
                    tokens,
                    [(item_ids[p], reason) for p, reason in failures],
                    positions_done=end,
                )
                bar.update(end - done)
                done = end
        seconds = time.perf_counter() - started
        failed = writer.failed()
        n_encoded = writer.n_rows
        writer.finish()
    finally:
        del batches  # shuts the workers down
        if writer is not None:
            writer.close()

    if failed:
        example = next(iter(failed.items()))
        log(f"{len(failed)} of {n} items could not be encoded (listed in {out}), e.g. {example[0]}: {example[1]}")
    return EncodeSummary(
        out=str(out),
        n_items=n,
        n_encoded=n_encoded,
        n_failed=len(failed),
        failed=failed,
        seconds=seconds,
        images_per_s=(n - start) / seconds if seconds > 0 else 0.0,
        resumed_from=start,
    )
