"""Image item towers: PixelNet and its cheap cached forms.

- FrozenTower   cached pooled embedding [E] -> adapter -> [d]
- PartialTower  cached split-block tokens [T, W] -> last K encoder blocks (trainable) -> head -> [d]
- E2ETower    raw covers -> open_clip tower (top K blocks trainable) -> head -> [d]   (e2e, the paper's PixelNet)
- HybridTower   IdTower + one image tower, summed or concatenated and projected; cold items (no id)
                take its image-only `cold_from_image` path (id dropout, count gate, image -> id map)

Heads turn the encoder's output into the recommender's dimension d:
- ``pooled``: the encoder's pooled output -> adapter (linear, or a small MLP);
- ``pooled_relu`` (the PixelRec code's head for CLIP ResNets and Swin): ReLU(Linear(pooled output));
- ``token_relu_mean`` (PixelRec's ViT PixelNet): mean over tokens of ReLU(Linear(h_t)) on the
  last block's hidden states, no final LayerNorm.

PartialTower and E2ETower with the same frozen lower blocks compute the same function; the cache
holds the exact weights of the top blocks, so a partial tower starts where the encoder was.
Each training step encodes each unique item of the batch once (ItemTower.forward gets unique ids).

When the item vector reads the class token only (a ViT whose 'model' pooling takes token 0, under
the ``pooled`` / ``pooled_relu`` heads), both towers run their last block for that token alone
(`cls_only_block`): the same numbers, without the other tokens' queries, output projection and MLP.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.images import ImageLoadError, open_image_store
from ..data.sequences import SequenceData
from ..encode.cache import open_cache
from ..encode.encoder import EncoderConfig, pool_and_project, run_blocks, build_encoder
from ..errors import PixelrecError
from ..runtime import log, progress
from .config import ADAPTERS, FEATURE_NORMS, HEADS, HYBRID_GATES, HYBRID_MODES, FitConfig
from .towers import IdTower, ItemTower

# Load the cache (or pre-decode images) into RAM when it takes less than this share of memory.
IN_MEMORY_SHARE = 0.25
# --feature-norm whiten: eigenvalues of the feature covariance are raised by this share of their mean
# before the inverse square root, so directions with almost no variance are not blown up into noise.
WHITEN_SHRINK = 0.05
# Run the last ViT block for the class token alone where that is exact (see `cls_only_applies`);
# `benchmarks/fit_cost.py --cls-only` sets it False for one tower to time the full last block (the old path).
CLS_ONLY_LAST_BLOCK = True


class FeatureNorm(nn.Module):
    """A fixed affine map of cached image features, fitted once to the training catalogue:
    x -> (x - shift) @ transform.

    ``standardize``: shift = mean, transform = diag(1 / sd) per feature. ``whiten``: shift = mean,
    transform = the (shrunk) inverse square root of the covariance (ZCA). A random-init encoder's
    pooled outputs share one large common direction (on the ML-100K covers: mean cosine similarity 0.9
    between items), so the adapter sees nearly equal inputs; centring and scaling gives it the
    differences between covers at unit scale.

    The buffers are saved with the model, so new covers are normalised with the training statistics;
    a checkpoint written before this existed (no such entries) loads as the identity, which is what
    its adapter was trained with.
    """

    def __init__(self, in_dim: int, kind: str):
        super().__init__()
        if kind not in ("standardize", "whiten"):
            raise PixelrecError(f"unknown --feature-norm {kind!r}; expected one of {', '.join(FEATURE_NORMS)}")
        self.kind = kind
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("transform", torch.eye(in_dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "FeatureNorm":
        """Set the statistics from features x [n, E] (float64 is used inside)."""
        x = x.double()
        if len(x) < 2:
            return self
        mean = x.mean(0)
        centred = x - mean
        if self.kind == "standardize":
            sd = centred.square().mean(0).sqrt()
            transform = torch.diag(1 / sd.clamp(min=1e-6 * float(sd.max()) + 1e-12))
        else:
            cov = centred.T @ centred / len(x)
            values, vectors = torch.linalg.eigh(cov)
            values = values.clamp(min=0) + WHITEN_SHRINK * float(values.clamp(min=0).mean()) + 1e-12
            transform = vectors @ torch.diag(values.rsqrt()) @ vectors.T
        self.shift.copy_(mean.float())
        self.transform.copy_(transform.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) @ self.transform

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "shift" not in state_dict and prefix + "transform" not in state_dict:  # an older checkpoint
            state_dict = {**state_dict, prefix + "shift": torch.zeros_like(self.shift),
                          prefix + "transform": torch.eye(len(self.shift))}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Adapter(nn.Module):
    """Image embedding [.., E] -> recommender space [.., d]: linear, or Linear-GELU-Linear.

    `dropout` on the image features regularises towards what covers share, which is what carries
    over to unseen (cold) covers. `feature_norm` (frozen features only) puts a `FeatureNorm` first;
    its owner fits it.
    """

    def __init__(self, in_dim: int, dim: int, kind: str = "linear", dropout: float = 0.0, feature_norm: str = "none"):
        super().__init__()
        self.norm = None if feature_norm == "none" else FeatureNorm(in_dim, feature_norm)
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
        if self.norm is not None:
            x = self.norm(x)
        return self.net(self.drop(x))


class PooledRelu(nn.Module):
    """The PixelRec code's head over a pooled output (CLIP ResNets' attnpool, Swin's pooled features):
    ReLU(Linear(x)); pooled [B, E] -> [B, d]."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.drop(pooled)))


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

    def __init__(self, cache, data: SequenceData, dim: int, adapter: str = "linear", dropout: float = 0.0,
                 feature_norm: str = "none"):
        super().__init__()
        self.num_items, self.dim = data.num_items, dim
        rows, self.missing = _row_map(cache, data)
        emb = np.zeros((data.num_items + 1, cache.dim), dtype=np.float16 if cache.embedding_dtype == np.float16 else np.float32)
        have = rows >= 0
        emb[have.numpy()] = cache.read_embeddings(rows[have].numpy())
        self.register_buffer("embeddings", torch.from_numpy(emb), persistent=False)  # [N + 1, E], from the cache
        self.adapter = Adapter(cache.dim, dim, adapter, dropout, feature_norm)
        if self.adapter.norm is not None:
            # statistics of the items the run trains on (with an image and training interactions):
            # cold items' covers stay unseen until they are served
            fit_on = have.numpy() & (data.train_counts > 0)
            self.adapter.norm.fit(torch.from_numpy(emb[fit_on]).float())

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.embeddings[idx].float())


class PartialTower(ItemTower):
    """Cached tokens entering the last K blocks -> those K blocks (trainable) -> head -> [d]."""

    vector_batch_size = 256

    def __init__(self, cache, data: SequenceData, dim: int, adapter: str = "linear", head: str = "pooled",
                 in_memory: str = "auto", dropout: float = 0.0, tune_head: bool = True):
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
        own_head = encoder_own_head(self.top)
        if own_head is not None and not tune_head:  # --no-tune-head: the encoder's head keeps its cached weights
            own_head.requires_grad_(False)
        self.head_kind = head
        self.head = _make_head(head, cache.dim, W, dim, adapter, dropout)
        self.cls_only = (head != "token_relu_mean" and hasattr(self.top, "blocks")
                         and cls_only_applies(self.top.blocks, self.top.head, self.top.pooling))

    def encoder_parameters(self):
        return (p for p in self.top.parameters() if p.requires_grad)

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
        if self.cls_only:
            top = self.top
            return self.head(cls_only_pooled(top.blocks, top.head, tokens, top.grad_checkpointing))
        return _apply_head(self.head_kind, self.head, self.top, tokens)


class E2ETower(ItemTower):
    """End-to-end PixelNet: covers -> open_clip image tower (top K blocks trainable) -> head -> [d]."""

    vector_batch_size = 256

    def __init__(self, encoder, store, data: SequenceData, dim: int, adapter: str = "linear",
                 head: str = "pooled", tune_blocks: int = -1, in_memory: str = "auto", workers: int = 0,
                 dropout: float = 0.0, tune_head: bool = True):
        super().__init__()
        self.num_items, self.dim = data.num_items, dim
        self.encoder = encoder
        encoder.set_trainable_blocks(tune_blocks, tune_head=tune_head)
        self.head_kind = head
        if head == "token_relu_mean":
            encoder._require_vit("--head token_relu_mean")
        self.head = _make_head(head, encoder.dim, encoder.width, dim, adapter, dropout)
        self.cls_only = (head != "token_relu_mean" and encoder.supports_split and encoder.split is None
                         and cls_only_applies(encoder.visual.transformer.resblocks, encoder.visual, encoder.pooling))
        # store None: a tower that only encodes given pixels (new covers through a trained run)
        self.pixels = None if store is None else PixelSource(encoder.pixel_loader(store), data, encoder.image_size,
                                                             in_memory, workers)

    def encoder_parameters(self):
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.from_pixels(self.pixels.get(idx).to(idx.device))

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[U, 3, H, W] preprocessed covers -> item vectors [U, d]."""
        if self.cls_only:
            enc = self.encoder
            tokens = enc.visual._embeds(pixels)  # what ImageEncoder.last_hidden feeds its blocks
            return self.head(cls_only_pooled(enc.visual.transformer.resblocks, enc.visual, tokens,
                                             enc.grad_checkpointing))
        return _apply_head(self.head_kind, self.head, self.encoder, pixels)


class CountGate(nn.Module):
    """How much an item leans on its id: g(c) = sigmoid(w * log(1 + c) + b) per dimension, c = the item's
    training interactions, w = softplus(.) >= 0, so g never decreases with c (more evidence, more id).

    [U] counts -> [U, d] in (0, 1). Cold items (c = 0) get sigmoid(b): the gate extrapolates to them
    from the low-count warm items it trained on.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.slope = nn.Parameter(torch.full((dim,), math.log(math.e - 1)))  # softplus(slope) = 1 at init
        self.bias = nn.Parameter(torch.zeros(dim))  # g(0) = 0.5 at init

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(counts.float().clamp(min=0)).unsqueeze(-1)
        return torch.sigmoid(x * F.softplus(self.slope) + self.bias)


class HybridTower(ItemTower):
    """IDNet + an image tower (``--hybrid sum``: added; ``concat``: concatenated and projected to d).

    An item's vector combines an id part and its image part b. Items with training interactions use
    their learned id embedding; items without (cold items, and items added after training) have no
    learned id, so they take the **cold path**: `cold_from_image(b)`, the same function for cold
    vocabulary items, for `index --add-images` and for items whose id is dropped in training.
    Three recipes shape it (all off = the plain hybrid; `build_image_tower` applies the configured ones):

    - ``id_dropout`` p (DropoutNet): in training, each warm item's id part is dropped with probability
      p, so the item takes the cold path and the image part must stand alone (as cold items do when
      served). The id tower is not run for dropped items, so their embeddings get no gradient.
    - ``gate="count"`` (`CountGate`): vector = g(c) * id part + (1 - g(c)) * image part, where c is the
      item's training-interaction count (0 on the cold path): warm items lean on the id, cold ones
      on the image.
    - ``image_to_id`` lambda > 0: a linear map `to_id` predicts the item's id embedding from its image
      part, trained by an auxiliary loss (relative squared error to the detached id embeddings of the
      warm items of each training step, times lambda; `auxiliary_loss`). The cold path uses the
      predicted id where a warm item uses its learned one.
    """

    def __init__(self, ids: IdTower, image: ItemTower, mode: str = "sum", known: torch.Tensor | None = None, *,
                 counts: torch.Tensor | None = None, id_dropout: float = 0.0, gate: str = "none",
                 image_to_id: float = 0.0):
        super().__init__()
        self.num_items, self.dim = ids.num_items, ids.dim
        self.cheap = image.cheap
        self.vector_batch_size = image.vector_batch_size
        self.ids, self.image, self.mode = ids, image, mode
        if counts is None:
            counts = torch.ones(ids.num_items + 1) if known is None else known.float()
        counts = counts.float().clone()
        counts[0] = 0
        if known is None:
            known = counts > 0
        self.register_buffer("counts", counts, persistent=False)  # [N + 1] training interactions per item
        self.register_buffer("known", known.bool(), persistent=False)  # [N + 1] has a learned id
        if mode == "concat":
            self.proj = nn.Linear(2 * self.dim, self.dim)
        elif mode not in ("sum", "switch"):
            raise PixelrecError(f"unknown --hybrid {mode!r}; expected one of {', '.join(HYBRID_MODES)}")
        if not 0 <= id_dropout < 1:
            raise PixelrecError(f"--id-dropout must be in [0, 1) (got {id_dropout})")
        self.id_dropout = float(id_dropout)
        if gate == "count" and mode == "switch":
            raise PixelrecError("--hybrid-gate count weighs the id and image parts of --hybrid sum or concat; "
                                "--hybrid switch uses one or the other (give --hybrid-gate none)")
        if gate == "count":
            self.gate: CountGate | None = CountGate(self.dim)
        elif gate == "none":
            self.gate = None
        else:
            raise PixelrecError(f"unknown --hybrid-gate {gate!r}; expected one of {', '.join(HYBRID_GATES)}")
        if not image_to_id >= 0:
            raise PixelrecError(f"--image-to-id must not be negative (got {image_to_id})")
        self.image_to_id = float(image_to_id)
        self.to_id: nn.Linear | None = None
        if image_to_id > 0:
            self.to_id = nn.Linear(self.dim, self.dim)
            nn.init.zeros_(self.to_id.weight)  # predicts 0 at init: the cold path starts as image-only
            nn.init.zeros_(self.to_id.bias)
        self._aux: list[torch.Tensor] = []  # [squared error, squared target norm] summed over training calls

    def encoder_parameters(self):
        get = getattr(self.image, "encoder_parameters", None)
        return get() if get else iter(())

    def combine(self, id_part: torch.Tensor, image_part: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sum / concat: [U, d] id part, [U, d] image part, [U] counts (0 on the cold path) -> item vectors [U, d]."""
        if self.gate is not None:
            g = self.gate(counts)
            id_part, image_part = g * id_part, (1 - g) * image_part
        if self.mode == "sum":
            return id_part + image_part
        return self.proj(torch.cat([id_part, image_part], dim=-1))

    def cold_from_image(self, image_part: torch.Tensor) -> torch.Tensor:
        """The cold path: vectors [U, d] of items without a learned id, from their image parts [U, d]."""
        predicted = self.to_id(image_part) if self.to_id is not None else None
        if self.mode == "switch":
            return image_part if predicted is None else predicted
        id_part = torch.zeros_like(image_part) if predicted is None else predicted
        return self.combine(id_part, image_part, image_part.new_zeros(len(image_part)))

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        b = self.image.encode(idx)  # [U, d]
        known = self.known[idx]
        has_id = known
        if self.training and self.id_dropout > 0:
            has_id = known & (torch.rand(len(idx), device=idx.device) >= self.id_dropout)
        id_part = b.new_zeros(b.shape)
        if bool(has_id.any()):
            id_part[has_id] = self.ids.encode(idx[has_id]).to(b.dtype)
        predicted = None
        if self.to_id is not None:
            predicted = self.to_id(b)
            if self.training and torch.is_grad_enabled() and bool(known.any()):
                self._collect_aux(predicted[known], idx[known])
        if self.mode == "switch":  # the id where there is one, else the cold path (= cold_from_image(b))
            return torch.where(has_id.unsqueeze(-1), id_part, b if predicted is None else predicted)
        if predicted is not None:
            id_part = torch.where(has_id.unsqueeze(-1), id_part, predicted)
        counts = torch.where(has_id, self.counts[idx], torch.zeros_like(self.counts[idx]))
        return self.combine(id_part, b, counts)

    def _collect_aux(self, predicted: torch.Tensor, idx: torch.Tensor) -> None:
        target = self.ids.embedding.weight.detach()[idx].to(predicted.dtype)  # the trained ids, no gradient
        err, norm = (predicted - target).square().sum(), target.square().sum()
        if self._aux:
            err, norm = err + self._aux[0], norm + self._aux[1]
        self._aux = [err, norm]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """image_to_id: lambda * |predicted - id|^2 / |id|^2 over the warm items encoded since the last call."""
        if not self._aux:
            return None
        err, norm = self._aux
        self._aux = []
        return self.image_to_id * err / norm.clamp(min=1e-12)


def encoder_own_head(top: nn.Module) -> nn.Module | None:
    """The image encoder's own pooling head inside a cached top part (`--tune-head` trains it): a ViT
    TopBlocks' ln_post / proj, a StageTop's attnpool (ResNet) or final norm / pool / proj (timm);
    None when the pooling has no weights (mean pooling)."""
    return getattr(top, "head", None) if hasattr(top, "blocks") else getattr(top, "tail", None)


def cls_only_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ViT block for the class token alone: [B, T, W] -> [B, 1, W], equal to block(x)[:, :1].

    ln_1 and the keys / values cover every token (the class token attends to all of them); the query,
    the attention's output projection, ls_1, ln_2, the MLP and ls_2 only the class token (index 0).
    """
    h = block.ln_1(x)  # [B, T, W]
    attended = block.attn(h[:, :1], h, h, need_weights=False)[0]  # [B, 1, W]
    y = x[:, :1] + block.ls_1(attended)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def cls_only_applies(blocks: nn.ModuleList, head: nn.Module | None, pooling: str) -> bool:
    """True when the pooled output reads only the class token of the last block's output: 'model'
    pooling of a ViT head with token pooling ('tok': token 0) and no attentional pool, and a last block
    that is a plain batch-first open_clip ResidualAttentionBlock (no cross-attention). Other poolings,
    heads and families need every token (or are not this block) and keep the full last block."""
    last = blocks[-1] if len(blocks) else None
    return (CLS_ONLY_LAST_BLOCK and pooling == "model" and head is not None
            and getattr(head, "attn_pool", None) is None and getattr(head, "pool_type", None) == "tok"
            and type(last) is ResidualAttentionBlock and not hasattr(last, "ln_1_kv")
            and isinstance(last.attn, nn.MultiheadAttention) and bool(last.attn.batch_first))


def cls_only_pooled(blocks: nn.ModuleList, head: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Tokens entering `blocks` [B, T, W] -> the head's pooled output [B, E], with the last block run
    for the class token only. The head's token pooling on [B, 1, W] takes that token, and ln_post is
    per token, so this equals head(blocks(x))."""
    x = run_blocks(blocks[:-1], x, grad_checkpointing)
    if grad_checkpointing and torch.is_grad_enabled():
        y = checkpoint(cls_only_block, blocks[-1], x, use_reentrant=False)
    else:
        y = cls_only_block(blocks[-1], x)
    return pool_and_project(head, y)


def _make_head(head: str, pooled_dim: int, width: int, dim: int, adapter: str, dropout: float = 0.0) -> nn.Module:
    if head == "pooled":
        return Adapter(pooled_dim, dim, adapter, dropout)
    if head == "pooled_relu":
        return PooledRelu(pooled_dim, dim, dropout)
    if head == "token_relu_mean":
        return TokenReluMean(width, dim, dropout)
    raise PixelrecError(f"unknown --head {head!r}; expected one of {', '.join(HEADS)}")


def _apply_head(head_kind: str, head: nn.Module, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: cached tokens (encoder a TopBlocks) or pixels (an ImageEncoder) -> item vectors [U, d].

    Both encoders have `last_hidden(x)`, the last block's output [U, T, W] that token-wise heads read;
    `pooled` and `pooled_relu` read their pooled output.
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
            tower: ItemTower = FrozenTower(cache, data, d, adapter, it.dropout, it.feature_norm)
        else:
            tower = PartialTower(cache, data, d, adapter, it.head, it.cache_in_memory, it.dropout, it.tune_head)
            if it.grad_checkpointing:
                tower.top.set_grad_checkpointing(True)
    elif kind == "side":
        from .side_tower import build_side_tower  # side_tower builds on this module's FrozenTower

        tower = build_side_tower(open_cache(it.cache), data, d, it, resolve_adapter(it.adapter, "frozen"))
    elif kind == "e2e":
        encoder = build_encoder(EncoderConfig(model=it.encoder, pretrained=it.pretrained, image_size=it.image_size,
                                              pooling="mean" if it.head == "token_relu_mean" else "model",
                                              preset=cfg.preset if cfg.preset in ("default", "pixelrec") else "default"))
        encoder.train()
        if it.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        store = open_image_store(it.images, follow_symlinks=it.follow_symlinks) if it.images else None
        tower = E2ETower(encoder, store, data, d, adapter, it.head, it.tune_blocks, it.cache_in_memory,
                         dropout=it.dropout, tune_head=it.tune_head)
    else:
        raise PixelrecError(f"--items {it.kind}: no image tower {kind!r}")
    if it.kind == "hybrid":
        return HybridTower(IdTower(data.num_items, d), tower, it.hybrid, counts=torch.from_numpy(data.train_counts),
                           id_dropout=it.id_dropout, gate=it.hybrid_gate, image_to_id=it.image_to_id)
    return tower
