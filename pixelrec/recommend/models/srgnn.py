"""SR-GNN (Wu et al. 2019): a gated graph network over the history's session graph, attention readout.

The session graph of a history has one node per UNIQUE item and an edge u -> v when v directly
follows u somewhere in the history (an edge counts once, as in the reference). Each of `--layers`
gated GNN steps lets a node take in its predecessors (in-adjacency, normalised by the node's
in-degree) and its successors (out-adjacency, normalised by its out-degree) through a GRU cell:

    a = [A_in (h W_in + b_in) + b_iah ; A_out (h W_out + b_out) + b_oah],  h <- GRUCell(a, h)

Each position then takes its item's node state; with h_last the most recent item's,
alpha_i = q^T sigmoid(W1 h_last + W2 h_i + c), s_g = sum over the real positions of alpha_i h_i, and
the user vector is W3 [s_g ; h_last] (the reference's order).

The graphs are built batched in torch (RecBole builds them per sample in numpy, its issues #1216 and
#1895): the item ids of each row are sorted, a node index is given to each distinct id
(`session_nodes`), and the adjacency [B, L, L] is one scatter_add of the consecutive real pairs
(`session_adjacency`). Nodes are numbered up to L per row; unused node slots have no edges and are
never read. The model needs the item indices to tell repeated items apart, so `Recommender.states`
passes them (`reads_items`).

Only the last position's state is a user vector: the earlier positions hold their items' node
states. It is trained on the last position of every prefix (the ``prefix`` objective).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SequenceConfig


def session_nodes(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """items [B, L] ids, mask [B, L] -> alias [B, L]: each position's node, one node per distinct
    real id of the row (numbered in id order); padded positions share one node of their own."""
    ids = items.masked_fill(~mask, -1)  # padding sorts first, apart from every real id
    sorted_ids, order = ids.sort(dim=1)
    new = torch.ones_like(sorted_ids, dtype=torch.long)
    new[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()
    return torch.empty_like(order).scatter_(1, order, new.cumsum(1) - 1)


def session_adjacency(alias: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alias, mask [B, L] -> (A_in, A_out) [B, L, L] over the node slots: A_in[v, u] = 1 / in-degree(v)
    and A_out[u, v] = 1 / out-degree(u) for each edge u -> v between consecutive real items."""
    B, L = alias.shape
    edge = (mask[:, :-1] & mask[:, 1:]).to(torch.float32)
    flat = alias[:, :-1] * L + alias[:, 1:]  # index of (u, v) in the flattened [L, L]
    adj = torch.zeros(B, L * L, device=alias.device).scatter_add_(1, flat, edge).clamp_(max=1).view(B, L, L)
    in_deg, out_deg = adj.sum(1).clamp(min=1), adj.sum(2).clamp(min=1)  # [B, L] each
    return adj.transpose(1, 2) / in_deg[:, :, None], adj / out_deg[:, :, None]


class GatedGraphStep(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.edge_in, self.edge_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bias_in, self.bias_out = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.cell = nn.GRUCell(2 * dim, dim)  # the reference's gates: h' = (1 - z) n + z h

    def forward(self, h: torch.Tensor, a_in: torch.Tensor, a_out: torch.Tensor) -> torch.Tensor:
        B, n, d = h.shape
        msg = torch.cat([a_in @ self.edge_in(h) + self.bias_in, a_out @ self.edge_out(h) + self.bias_out], 2)
        return self.cell(msg.reshape(B * n, 2 * d), h.reshape(B * n, d)).view(B, n, d)


class SRGNN(nn.Module):
    reads_items = True  # forward(x, mask, items): repeated items are one node

    def __init__(self, cfg: SequenceConfig):
        super().__init__()
        d = cfg.dim
        self.steps = nn.ModuleList(GatedGraphStep(d) for _ in range(cfg.layers))
        self.drop = nn.Dropout(cfg.dropout)
        self.w1, self.w2 = nn.Linear(d, d), nn.Linear(d, d)
        self.q = nn.Linear(d, 1, bias=False)
        self.w3 = nn.Linear(2 * d, d)
        bound = 1.0 / math.sqrt(d)  # the reference's (and RecBole's) init of every parameter
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] item vectors, mask [B, L], items [B, L] ids -> states [B, L, d] (user vector last)."""
        B, L, d = x.shape
        alias = session_nodes(items, mask)
        a_in, a_out = (a.to(x.dtype) for a in session_adjacency(alias, mask))
        index = alias[..., None].expand(B, L, d)
        # node vectors: the mean of the item's copies (equal vectors; each copy gets its share of the gradient)
        h = self.drop(torch.zeros_like(x).scatter_reduce(1, index, x, "mean", include_self=False))
        for step in self.steps:
            h = step(h, a_in, a_out)
        seq = h.gather(1, index)  # [B, L, d] each position's node state
        last = seq[:, -1]
        alpha = self.q(torch.sigmoid(self.w1(last)[:, None] + self.w2(seq)))  # [B, L, 1]
        s_g = (alpha * seq * mask[..., None]).sum(1)
        user = self.w3(torch.cat([s_g, last], 1))
        return torch.cat([seq[:, :-1], user[:, None]], 1)


def token_macs(cfg: SequenceConfig) -> float:
    """Forward multiply-adds per window position (losses.sequence_macs): per gated step 2 d^2 (edge
    maps), 2 L d (in- and out-adjacency products over L node slots) and 9 d^2 (GRU cell, input 2d);
    the readout's d^2 + d per position (W2, q) and 3 d^2 per window (W1, W3) shared by its L positions."""
    d, L = cfg.dim, cfg.max_len
    return cfg.layers * (11 * d * d + 2 * L * d) + d * d + d + 3 * d * d / L
