"""LightSANs (Fan et al. 2021): low-rank decomposed self-attention with decoupled positions.

Each layer pools the window's keys and values into k latent interests (a learned item-to-interest
softmax over positions, `InterestPooling`), lets every position attend to those k interests instead of
to all L positions, and adds a separate position-to-position attention whose weights come from
position embeddings only (decoupled position encoding) and whose values are the items' values. Then
output projection, residual, LayerNorm and a GELU feed-forward, post-LN as in the reference.

Choices (docs/models.md):
- Padding is masked: padded slots get no weight in the interest pooling and are no key of the
  position attention, and positions are counted back from the window's last slot, so a history's
  user vector does not depend on how much left padding it has. (The reference masks nothing.)
- Attention weights are a softmax over what is attended to (the k interests, the key positions); the
  reference's and RecBole's `Softmax(dim=-2)` normalises over the query positions instead.
- The interest pooling sees the whole window, so a state is not causal: the model is trained on
  its window's last position only (the ``prefix`` objective, `--windows prefixes`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import PixelrecError
from ..config import SequenceConfig
from .layers import POST_LN_EPS, init_weights


class InterestPooling(nn.Module):
    """[B, L, d] -> [B, k, d]: k softmax-over-positions weighted sums of the real positions."""

    def __init__(self, dim: int, interests: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim, interests) / math.sqrt(dim))

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        logits = (x @ self.theta).masked_fill(~keys[..., None], float("-inf"))  # [B, L, k]
        return torch.einsum("blk,bld->bkd", logits.softmax(dim=1), x)


class LightAttention(nn.Module):
    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise PixelrecError(f"--dim {cfg.dim} is not divisible by the number of heads ({cfg.heads})")
        d = cfg.dim
        self.heads, self.head_dim = cfg.heads, d // cfg.heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.pool_key, self.pool_value = InterestPooling(d, cfg.interests), InterestPooling(d, cfg.interests)
        self.pos_ln = nn.LayerNorm(d, eps=POST_LN_EPS)
        self.pos_q, self.pos_k = nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(cfg.attn_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln = nn.LayerNorm(d, eps=POST_LN_EPS)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, d] -> [B, h, n, d/h]."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; keys [B, L] bool (positions that may be attended to); pos [L, d] position embeddings."""
        B, L, d = x.shape
        q, v = self._split(self.query(x)), self.value(x)
        k_int = self._split(self.pool_key(self.key(x), keys))  # [B, h, k, d/h]
        v_int = self._split(self.pool_value(v, keys))
        item_w = (q @ k_int.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(-1)  # [B, h, L, k]
        context = self.attn_drop(item_w) @ v_int
        p = self.pos_ln(pos)[None]  # [1, L, d]
        pos_logits = self._split(self.pos_q(p)) @ self._split(self.pos_k(p)).transpose(-1, -2)  # [1, h, L, L]
        pos_logits = (pos_logits / math.sqrt(2 * self.head_dim)).masked_fill(~keys[:, None, None, :], float("-inf"))
        context = context + self.attn_drop(pos_logits.softmax(-1)) @ self._split(v)
        out = self.drop(self.proj(context.transpose(1, 2).reshape(B, L, d)))
        return self.ln(x + out)


class LightLayer(nn.Module):
    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.attn = LightAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.inner_mult * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.inner_mult * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout))
        self.ln = nn.LayerNorm(cfg.dim, eps=POST_LN_EPS)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, keys, pos)
        return self.ln(x + self.mlp(x))


class LightSANs(nn.Module):
    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.ln_in = nn.LayerNorm(cfg.dim, eps=POST_LN_EPS)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(LightLayer(cfg) for _ in range(cfg.layers))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        keys = mask.clone()
        keys[:, -1] = True  # an empty history still has a key (no softmax over nothing)
        pos = self.pos.weight[-L:]  # counted back from the last slot: the same for any padding
        x = self.drop(self.ln_in(x))
        for layer in self.layers:
            x = layer(x, keys, pos)
        return x


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position (losses.sequence_macs), per layer: 4 d^2 (query, key,
    value, output), 2 inner d^2 (feed-forward), 6 k d over the k interests (pooling weights and sums of
    keys and values, scores and weighted sum) and L d (the position attention's weighted sum; its
    weights come from the position embeddings, once per window shape, not per window)."""
    d, k = cfg.dim, cfg.interests
    return cfg.layers * (4 * d * d + 2 * cfg.inner_mult * d * d + 6 * k * d + cfg.max_len * d)
