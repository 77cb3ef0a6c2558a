"""Item towers: unique item indices [U] -> item vectors [U, d].

IDNet and PixelNet differ only here. Index 0 is padding and always maps to the zero vector.
A training step calls the tower once on the batch's unique items, never once per position.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import progress


class ItemTower(nn.Module):
    """Base class. Subclasses implement `encode(idx)` for real items (idx >= 1)."""

    dim: int
    num_items: int  # real items; valid indices are 1..num_items
    cheap: bool = False  # computing every item's vector each step is affordable (allows full softmax)
    vector_batch_size: int = 4096  # items per chunk when computing the whole catalogue's vectors

    def encode(self, idx: torch.Tensor) -> torch.Tensor:  # [U] -> [U, d]
        raise NotImplementedError

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss of the tower itself over the items its last training-mode calls encoded (e.g. a
        regulariser tying image vectors to id vectors), added to the recommendation loss; None = none.
        Towers that have one collect what they need in `encode` and reset it here."""
        return None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [U] (0 = padding) -> [U, d]; only real items reach `encode`, padding gives zeros."""
        real = idx != 0
        if bool(real.all()):
            return self.encode(idx)
        if not bool(real.any()):
            return torch.zeros(*idx.shape, self.dim, device=idx.device)
        vecs = self.encode(idx[real])
        out = vecs.new_zeros(*idx.shape, vecs.shape[-1])
        out[real] = vecs
        return out

    @torch.no_grad()
    def all_vectors(self, batch_size: int | None = None) -> torch.Tensor:
        """[num_items + 1, d] vectors of the whole catalogue (row 0 = padding = zeros)."""
        device = next(self.parameters()).device
        idx = torch.arange(self.num_items + 1, device=device)
        chunks = idx.split(batch_size or self.vector_batch_size)
        if len(chunks) > 4:
            chunks = progress(chunks, desc="item vectors", unit="batch")
        return torch.cat([self(chunk).float() for chunk in chunks])


class IdTower(ItemTower):
    """IDNet: one learned embedding per item."""

    cheap = True

    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self.num_items, self.dim = num_items, dim
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding(idx)

    @torch.no_grad()
    def all_vectors(self, batch_size: int | None = None) -> torch.Tensor:
        return self.embedding.weight.detach().float().clone()


class TableTower(ItemTower):
    """Precomputed item vectors (a finished run's index): evaluation and serving without re-encoding."""

    cheap = True

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.num_items, self.dim = table.shape[0] - 1, table.shape[1]
        self.register_buffer("table", table.float())
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the module a device

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]

    @torch.no_grad()
    def all_vectors(self, batch_size: int | None = None) -> torch.Tensor:
        return self.table.clone()
