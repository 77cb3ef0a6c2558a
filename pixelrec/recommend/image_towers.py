"""Image item towers: PixelNet and its cheap cached forms.

- FrozenTower   cached pooled embedding [E] -> adapter -> [d]
- PartialTower  cached split-block tokens [T, W] -> last K encoder blocks (trainable) -> head -> [d]
- E2ETower    raw covers -> open_clip tower (top K blocks trainable) -> head -> [d]   (e2e, the paper's PixelNet)
- HybridTower   IdTower + one image tower, summed or concatenated and projected

Heads turn the encoder's output into the recommender's dimension d:
- ``pooled``: the encoder's pooled output -> adapter (linear, or a small MLP);
- ``token_relu_mean`` (PixelRec's ViT PixelNet): mean over tokens of ReLU(Linear(h_t)) on the
  last block's hidden states, no final LayerNorm.

PartialTower and E2ETower with the same frozen lower blocks compute the same function; the cache
holds the exact weights of the top blocks, so a partial tower starts where the encoder was.
Each training step encodes each unique item of the batch once (ItemTower.forward gets unique ids).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from ..data.images import ImageLoadError, open_image_store
from ..data.sequences import SequenceData
from ..encode.cache import open_cache
from ..encode.encoder import EncoderConfig, build_encoder
from ..errors import PixelrecError
from ..runtime import log, progress
from .config import ADAPTERS, HEADS, HYBRID_MODES, FitConfig
from .towers import IdTower, ItemTower

# Load the cache (or pre-decode images) into RAM when it takes less than this share of memory.
IN_MEMORY_SHARE = 0.25


class Adapter(nn.Module):
    """Image embedding [.., E] -> recommender space [.., d]: linear, or Linear-GELU-Linear.

    `dropout` on the image features regularises towards what covers share, which is what carries
    over to unseen (cold) covers.
    """

    def __init__(self, in_dim: int, dim: int, kind: str = "linear", dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        if kind == "linear":
            self.net = nn.Linear(in_dim, dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        else:
            raise PixelrecError(f"unknown --adapter {kind!r}; expected one of {', '.join(ADAPTERS)}")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.drop(x))


class TokenReluMean(nn.Module):
    """PixelRec's ViT head: mean_t ReLU(Linear(h_t)); hidden [B, T, W] -> [B, d]."""

    def __init__(self, width: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.drop(hidden))).mean(dim=1)


def _row_map(cache, data: SequenceData) -> tuple[torch.Tensor, int]:
    """[N + 1] cache row of every vocabulary item (-1 when it has no cached image), and the miss count."""
    rows = np.full(data.num_items + 1, -1, dtype=np.int64)
    rows[1:] = cache.rows_for(data.item_ids[1:])
    missing = int((rows[1:] < 0).sum())
    if missing:
        example = data.item_ids[1:][rows[1:] < 0][:3]
        log(f"{missing} of {data.num_items} items have no image in {cache.path} (failed or not encoded, e.g. "
            f"{', '.join(map(str, example))}); they get a zero image input")
    return torch.from_numpy(rows), missing


def _fits_in_memory(nbytes: int, setting: str) -> bool:
    if setting in ("yes", "no"):
        return setting == "yes"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return nbytes <= IN_MEMORY_SHARE * total


class FrozenTower(ItemTower):
    """Cached pooled embeddings (fixed) -> trainable adapter."""

    cheap = True

    def __init__(self, cache, data: SequenceData, dim: int, adapter: str = "linear", dropout: float = 0.0):
        super().__init__()
        self.num_items, self.dim = data.num_items, dim
        rows, self.missing = _row_map(cache, data)
        emb = np.zeros((data.num_items + 1, cache.dim), dtype=np.float16 if cache.embedding_dtype == np.float16 else np.float32)
        have = rows >= 0
        emb[have.numpy()] = cache.read_embeddings(rows[have].numpy())
        self.register_buffer("embeddings", torch.from_numpy(emb), persistent=False)  # [N + 1, E], from the cache
        self.adapter = Adapter(cache.dim, dim, adapter, dropout)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.embeddings[idx].float())


class PartialTower(ItemTower):
    """Cached tokens entering the last K blocks -> those K blocks (trainable) -> head -> [d]."""

    vector_batch_size = 256

    def __init__(self, cache, data: SequenceData, dim: int, adapter: str = "linear", head: str = "pooled",
                 in_memory: str = "auto", dropout: float = 0.0):
        super().__init__()
        if not cache.has_tokens:
            raise PixelrecError(f"{cache.path} has no tokens: encode with --split-block K for --items partial")
        self.num_items, self.dim = data.num_items, dim
        self.cache = cache
        rows, self.missing = _row_map(cache, data)
        self.register_buffer("rows", rows, persistent=False)
        T, W = cache.token_shape
        self.token_shape = (T, W)
        nbytes = len(cache) * T * W * 2
        self.tokens = None
        if _fits_in_memory(nbytes, in_memory):
            self.tokens = torch.from_numpy(cache.read_tokens(np.arange(len(cache))))  # [N_cache, T, W] float16
        self.top = cache.top_blocks()  # exact weights that produced the cached embeddings
        self.head_kind = head
        self.head = _make_head(head, cache.dim, W, dim, adapter, dropout)

    def encoder_parameters(self):
        return self.top.parameters()

    def read_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Cached tokens of items idx [U] -> [U, T, W] float32 (zeros for items without an image)."""
        rows = self.rows[idx].cpu()
        out = torch.zeros(len(idx), *self.token_shape)
        have = rows >= 0
        if have.any():
            r = rows[have]
            got = self.tokens[r] if self.tokens is not None else torch.from_numpy(self.cache.read_tokens(r.numpy()))
            out[have] = got.float()
        return out.to(idx.device)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.from_tokens(self.read_tokens(idx))

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[U, T, W] tokens entering the last K blocks -> item vectors [U, d]."""
        return _apply_head(self.head_kind, self.head, self.top, tokens)


class E2ETower(ItemTower):
    """End-to-end PixelNet: covers -> open_clip image tower (top K blocks trainable) -> head -> [d]."""

    vector_batch_size = 256

    def __init__(self, encoder, store, data: SequenceData, dim: int, adapter: str = "linear",
                 head: str = "pooled", tune_blocks: int = -1, in_memory: str = "auto", workers: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.num_items, self.dim = data.num_items, dim
        self.encoder = encoder
        encoder.set_trainable_blocks(tune_blocks)
        self.head_kind = head
        if head == "token_relu_mean":
            encoder._require_vit("--head token_relu_mean")
        self.head = _make_head(head, encoder.dim, encoder.width, dim, adapter, dropout)
        # store None: a tower that only encodes given pixels (new covers through a trained run)
        self.pixels = None if store is None else PixelSource(encoder.pixel_loader(store), data, encoder.image_size,
                                                             in_memory, workers)

    def encoder_parameters(self):
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.from_pixels(self.pixels.get(idx).to(idx.device))

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[U, 3, H, W] preprocessed covers -> item vectors [U, d]."""
        return _apply_head(self.head_kind, self.head, self.encoder, pixels)


class HybridTower(ItemTower):
    """IDNet + an image tower: sum, or concatenation projected back to d.

    Items without training interactions (cold items) have no learned id, so their id part is zero
    and their vector comes from the image alone.
    """

    def __init__(self, ids: IdTower, image: ItemTower, mode: str = "sum", known: torch.Tensor | None = None):
        super().__init__()
        self.num_items, self.dim = ids.num_items, ids.dim
        self.cheap = image.cheap
        self.vector_batch_size = image.vector_batch_size
        self.ids, self.image, self.mode = ids, image, mode
        if known is None:
            known = torch.ones(ids.num_items + 1, dtype=torch.bool)
        self.register_buffer("known", known.bool(), persistent=False)  # [N + 1] has training interactions
        if mode == "concat":
            self.proj = nn.Linear(2 * self.dim, self.dim)
        elif mode != "sum":
            raise PixelrecError(f"unknown --hybrid {mode!r}; expected one of {', '.join(HYBRID_MODES)}")

    def encoder_parameters(self):
        get = getattr(self.image, "encoder_parameters", None)
        return get() if get else iter(())

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        a = self.ids.encode(idx) * self.known[idx].unsqueeze(-1)  # [U, d]; zero for cold items
        b = self.image.encode(idx)
        return a + b if self.mode == "sum" else self.proj(torch.cat([a, b], dim=-1))


def _make_head(head: str, pooled_dim: int, width: int, dim: int, adapter: str, dropout: float = 0.0) -> nn.Module:
    if head == "pooled":
        return Adapter(pooled_dim, dim, adapter, dropout)
    if head == "token_relu_mean":
        return TokenReluMean(width, dim, dropout)
    raise PixelrecError(f"unknown --head {head!r}; expected one of {', '.join(HEADS)}")


def _apply_head(head_kind: str, head: nn.Module, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: cached tokens (encoder a TopBlocks) or pixels (an ImageEncoder) -> item vectors [U, d].

    Both encoders have `last_hidden(x)`, the last block's output [U, T, W] that token-wise heads read.
    """
    if head_kind == "token_relu_mean":
        return head(encoder.last_hidden(x))  # [U, T, W] -> [U, d]
    return head(encoder(x))  # pooled [U, E] -> [U, d]


class PixelSource:
    """Preprocessed pixels of vocabulary items: pre-decoded in RAM when they fit, else loaded per call.

    Items whose image cannot be loaded get zero pixels (counted and logged once, never silently).
    """

    def __init__(self, loader, data: SequenceData, image_size: int, in_memory: str = "auto", workers: int = 0):
        self.loader = loader
        self.names = data.item_ids
        self.shape = (3, image_size, image_size)
        self.failed: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
        self.bank = None
        nbytes = (data.num_items + 1) * 3 * image_size * image_size * 2
        if _fits_in_memory(nbytes, in_memory):
            idx = torch.arange(1, data.num_items + 1)
            bank = torch.zeros(data.num_items + 1, *self.shape, dtype=torch.float16)
            for chunk in progress(idx.split(512), desc="decode covers", unit="batch"):
                bank[chunk] = self._load(chunk).half()
            self.bank = bank
        if self.failed:
            first = next(iter(self.failed.items()))
            log(f"{len(self.failed)} covers could not be loaded (e.g. {first[0]}: {first[1]}); they get zero pixels")

    def _load_one(self, i: int) -> torch.Tensor:
        name = str(self.names[i])
        try:
            return self.loader(name)
        except ImageLoadError as exc:
            self.failed[name] = exc.reason
            return torch.zeros(self.shape)

    def _load(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self.pool.map(self._load_one, idx.tolist())))

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        if self.bank is not None:
            return self.bank[idx].float()
        return self._load(idx)

    def __getstate__(self):
        raise TypeError("PixelSource is not picklable")


def resolve_adapter(adapter: str, kind: str) -> str:
    """'auto': an MLP for frozen (only the adapter can reshape fixed features), linear after trainable blocks."""
    if adapter == "auto":
        return "mlp" if kind == "frozen" else "linear"
    return adapter


def build_image_tower(cfg: FitConfig, data: SequenceData) -> ItemTower:
    """The image (or hybrid) tower a FitConfig describes."""
    it, d = cfg.items, cfg.model.dim
    kind = it.image_branch if it.kind == "hybrid" else it.kind
    adapter = resolve_adapter(it.adapter, kind)
    if kind in ("frozen", "partial"):
        cache = open_cache(it.cache)
        if kind == "frozen":
            tower: ItemTower = FrozenTower(cache, data, d, adapter, it.dropout)
        else:
            tower = PartialTower(cache, data, d, adapter, it.head, it.cache_in_memory, it.dropout)
            if it.grad_checkpointing:
                tower.top.set_grad_checkpointing(True)
    elif kind == "e2e":
        encoder = build_encoder(EncoderConfig(model=it.encoder, pretrained=it.pretrained, image_size=it.image_size,
                                              pooling="mean" if it.head == "token_relu_mean" else "model",
                                              preset=cfg.preset if cfg.preset in ("default", "pixelrec") else "default"))
        encoder.train()
        if it.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        store = open_image_store(it.images) if it.images else None
        tower = E2ETower(encoder, store, data, d, adapter, it.head, it.tune_blocks, it.cache_in_memory,
                         dropout=it.dropout)
    else:
        raise PixelrecError(f"--items {it.kind}: no image tower {kind!r}")
    if it.kind == "hybrid":
        return HybridTower(IdTower(data.num_items, d), tower, it.hybrid, torch.from_numpy(data.train_counts > 0))
    return tower
