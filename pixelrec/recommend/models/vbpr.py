"""VBPR (He & McAuley 2016), as one dot product that FAISS serves unchanged.

score(u, i) = <gamma_u, gamma_i> + <theta_u, E f_i> + beta' . f_i

with f_i the item's frozen cached embedding (`pixelrec encode`), gamma a learned id factor per user
and per item (half of --dim), theta_u the user's visual factors, E a learned projection and beta' a
learned visual bias (the PixelRec reference's ViNet/vbpr.py; its global, user and item biases are
commented out there and absent here). Written as user [gamma_u, theta_u, 1] and item
[gamma_i, E f_i, beta' . f_i]: `VBPRUser` is MF with the last coordinate fixed at 1, `VBPRTower` the
item tower. The projection [E; beta'] is one linear map of f_i (the frozen tower's linear adapter,
whose bias adds only a per-user constant to the scores), and it is the tower's image part, so
`--decay-groups pixelrec` trains it at --encoder-lr / --encoder-weight-decay as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PixelrecError
from ..towers import ItemTower
from .mf import MF, token_macs  # noqa: F401 (VBPR's user side costs what MF's does)


class VBPRUser(MF):
    """[gamma_u, theta_u] learned per training user, then the constant 1 that multiplies the visual bias."""

    fixed_tail = (1.0,)


def id_width(dim: int) -> int:
    """Coordinates of gamma (the id factors): half of --dim; the rest is theta (and the bias slot)."""
    return dim // 2


class VBPRTower(ItemTower):
    """item i -> [gamma_i, E f_i, beta' . f_i] ([N + 1, dim]; row 0 = padding = zeros)."""

    cheap = True

    def __init__(self, num_items: int, dim: int, image: ItemTower):
        super().__init__()
        if dim < 4:
            raise PixelrecError(f"--model vbpr needs --dim of at least 4 (id factors, visual factors and the "
                                f"visual bias; got {dim})")
        self.num_items, self.dim = num_items, dim
        self.embedding = nn.Embedding(num_items + 1, id_width(dim), padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.image = image  # frozen cached embeddings -> [E f_i, beta' . f_i] (dim - id_width(dim) wide)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(idx), self.image.encode(idx)], -1)


def build_vbpr_tower(cfg, data) -> VBPRTower:
    """The tower of `--model vbpr --items frozen --cache CACHE.h5`: every item with interactions must have
    a cached embedding (refused in one line otherwise)."""
    from ...encode.cache import open_cache
    from ..image_towers import FrozenTower

    it, d = cfg.items, cfg.model.dim
    cache = open_cache(it.cache)
    image = FrozenTower(cache, data, d - id_width(d), "linear", it.dropout, it.feature_norm)
    if image.missing:
        rows = cache.rows_for(data.item_ids[1:])
        example = ", ".join(map(str, data.item_ids[1:][rows < 0][:3]))
        raise PixelrecError(f"{it.cache}: {image.missing} of {data.num_items} items of {cfg.interactions} have no "
                            f"cached embedding (e.g. {example}); --model vbpr reads every item's: encode their covers "
                            f"with `pixelrec encode --images COVERS --out CACHE.h5`")
    return VBPRTower(data.num_items, d, image)
