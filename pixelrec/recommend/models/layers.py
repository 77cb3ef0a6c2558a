"""Building blocks shared by the sequence models: attention, the transformer block, weight init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PixelrecError
from ..config import SequenceConfig

POST_LN_EPS = 1e-12  # RecBole / PixelRec layer_norm_eps (PixelNet/sasrec.yaml)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        if dim % heads:
            raise PixelrecError(f"--dim {dim} is not divisible by the number of heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: [B, 1, L, L] bool, or [B, h, L, L] float bias with -inf where not allowed."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, h, L, d/h]
        if allowed.is_floating_point():
            allowed = allowed.to(q.dtype)  # autocast: the bias must match the query's dtype
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, d)))


class Block(nn.Module):
    """Transformer block: pre-LN (x + f(LN(x))) or, with ``cfg.norm == "post"``, post-LN
    (LN(x + f(x)), eps 1e-12: the RecBole / PixelRec TransformerLayer)."""

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        self.post = cfg.norm == "post"
        eps = POST_LN_EPS if self.post else 1e-5
        self.ln1 = nn.LayerNorm(cfg.dim, eps=eps)
        self.attn = CausalSelfAttention(cfg.dim, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.inner_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.inner_mult * cfg.dim, cfg.dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.ln1(x + self.attn(x, allowed))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.GRU):
        for name, p in module.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)
