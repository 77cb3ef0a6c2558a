"""The `side` item tower: a small side network over the cached per-layer states of a frozen encoder.

IISAN's intra-modal chain (Fu et al., SIGIR 2024), over the states `pixelrec encode --hidden` caches
(tap t: a ViT's class-token state after block t, with `cls+mean` also the mean of its patch tokens;
a ResNet / Swin / ConvNeXt stage's output pooled over positions):

    x_t = LayerNorm_t(h_t)                                  (then Linear to the state width where taps differ)
    s_0 = 0,  s_t = SANB_t(g_t * x_t + (1 - g_t) * s_(t-1)),  g_t = sigmoid(w_t / 0.1),  w_t = 0 at init
    SANB(x) = x + W_up ReLU(W_down x)                       (bottleneck --side-dim)
    e = W_out GELU(W_fc s_T)                                (the state width -> the recommender's d)

With `--side-residual` the frozen tower (the cached pooled embedding through its adapter, built first
so that it draws the same initial weights as `--items frozen`) is added and W_out starts at zero, so
at step 0 the tower equals `frozen`. The side network's own weights are drawn from a forked random
generator, so the rest of the model (the sequence encoder) also starts where a frozen run starts.

Nothing runs through the image encoder in training: the states are read from the cache (into RAM
unless --cache-in-memory no), so only the side network, its head and the frozen part's adapter learn.
New covers (`index --add-images`, `serve` uploads) go through the encoder once to their taps
(`ImageEncoder.forward_hidden`), then through `from_states`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sequences import SequenceData
from ..encode.cache import EmbeddingCache
from ..encode.cache_reader import hidden_encode_command
from ..encode.encoder import parse_taps
from ..errors import PixelrecError
from .config import ItemsConfig
from .image_towers import FrozenTower, _fits_in_memory, _row_map
from .towers import ItemTower

GATE_TEMPERATURE = 0.1  # g = sigmoid(w / 0.1), IISAN's
ADAPTER_INIT_STD = 0.01  # IISAN's SANB weights: N(0, 0.01), biases zero


class Bottleneck(nn.Module):
    """IISAN's side adapted network block: x + W_up ReLU(W_down x); [.., S] -> [.., S]."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=ADAPTER_INIT_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class SideNetwork(nn.Module):
    """Per-layer states [B, T, W] (tap t's first widths[t] features) -> item vectors [B, d]."""

    def __init__(self, widths: list[int], dim: int, bottleneck: int, zero_head: bool = False):
        super().__init__()
        self.widths = list(widths)
        state = max(widths)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        # taps narrower than the state (ResNet / Swin stages) are mapped to its width; equal ones are not
        self.lifts = nn.ModuleList(nn.Identity() if w == state else nn.Linear(w, state) for w in widths)
        self.gates = nn.Parameter(torch.zeros(len(widths)))  # g = 0.5 at init
        self.blocks = nn.ModuleList(Bottleneck(state, bottleneck) for _ in widths)
        self.fc = nn.Linear(state, state)
        self.out = nn.Linear(state, dim)
        if zero_head:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.gates / GATE_TEMPERATURE)
        s = states.new_zeros(len(states), self.fc.in_features)  # s_0 = 0
        for t, width in enumerate(self.widths):
            x = self.lifts[t](self.norms[t](states[:, t, :width]))
            s = self.blocks[t](gates[t] * x + (1 - gates[t]) * s)
        return self.out(F.gelu(self.fc(s)))


def side_taps(cache: EmbeddingCache, spec: str) -> list[int]:
    """`--side-taps` -> the cache's tap numbers it names; one line naming the cache and the encode
    command that makes a matching one for a cache without states or without those taps."""
    cache.require_hidden("--items side")
    have = list(cache.hidden_taps)
    tap_range = int(cache.attrs.get("hidden_tap_range") or 0)
    text = str(spec).strip()
    if text not in ("all", "even"):
        try:
            asked = sorted({int(part) for part in text.split(",")})
        except ValueError:
            asked = []
        beyond = [t for t in asked if not 0 <= t < tap_range]
        if beyond:
            raise PixelrecError(f"--side-taps {spec}: tap {beyond[0]} is out of range for {cache.attrs.get('model')} "
                                f"(taps 0..{tap_range - 1}); {cache.path} holds taps {_taps_text(have)}, and "
                                f"{hidden_encode_command(cache.attrs, taps='all')} makes a cache with every tap")
    where = (f"{cache.path} holds taps {_taps_text(have)}; make a cache with them: "
             f"{hidden_encode_command(cache.attrs, taps=text)}")
    return parse_taps(text, have, "--side-taps", where)


def _taps_text(taps: list[int]) -> str:
    return ",".join(map(str, taps))


class SideTower(ItemTower):
    """Cached per-layer states -> side network -> [d] (+ the frozen tower with `residual`)."""

    cheap = True  # no image blocks: every item's vector is a small MLP chain over cached states

    def __init__(self, cache: EmbeddingCache, data: SequenceData, dim: int, taps: str = "all",
                 bottleneck: int = 64, residual: bool = False, adapter: str = "mlp", dropout: float = 0.0,
                 in_memory: str = "auto"):
        super().__init__()
        chosen = side_taps(cache, taps)
        self.num_items, self.dim, self.cache = data.num_items, dim, cache
        self.kind = cache.hidden_kind
        self.taps = chosen
        self.columns = [cache.hidden_taps.index(t) for t in chosen]  # where they sit in the cache's rows
        widths = [cache.hidden_widths[c] for c in self.columns]
        self.frozen = FrozenTower(cache, data, dim, adapter, dropout) if residual else None  # first: frozen's init
        self.drop = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            self.side = SideNetwork(widths, dim, bottleneck, zero_head=residual)
        rows, self.missing = _row_map(cache, data)
        self.register_buffer("rows", rows, persistent=False)
        self.width = max(widths)
        self.states = None
        nbytes = len(cache) * len(chosen) * self.width * 2
        if _fits_in_memory(nbytes, in_memory):  # [N_cache, T, W] float16, read in chunks of rows
            chunks = np.array_split(np.arange(len(cache)), max(1, -(-len(cache) // 4096)))
            self.states = torch.from_numpy(np.concatenate([self._read(rows) for rows in chunks]))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The chosen taps of cache rows, cut to the widest chosen tap."""
        got = self.cache.read_hidden(rows)
        return np.ascontiguousarray(got[:, self.columns, : self.width])

    def read_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Cached states of items idx [U] -> [U, T, W] float32 (zeros for items without an image)."""
        rows = self.rows[idx].cpu()
        out = torch.zeros(len(idx), len(self.taps), self.width)
        have = rows >= 0
        if have.any():
            r = rows[have]
            got = self.states[r] if self.states is not None else torch.from_numpy(self._read(r.numpy()))
            out[have] = got.float()
        return out.to(idx.device)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        pooled = self.frozen.embeddings[idx].float() if self.frozen is not None else None
        return self.from_states(self.read_states(idx), pooled)

    def from_states(self, states: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """States [U, T, W] of the chosen taps (and, with the residual, pooled embeddings [U, E] as the
        cache holds them) -> item vectors [U, d]."""
        out = self.side(self.drop(states))
        if self.frozen is not None:
            if pooled is None:
                raise PixelrecError("a side tower with --side-residual needs the pooled embeddings too")
            out = out + self.frozen.adapter(pooled)
        return out


def build_side_tower(cache: EmbeddingCache, data: SequenceData, dim: int, items: ItemsConfig,
                     adapter: str) -> SideTower:
    """The side tower a fit configuration's items section describes (`adapter`: resolved, for the
    frozen part of --side-residual)."""
    return SideTower(cache, data, dim, items.side_taps, items.side_dim, items.side_residual, adapter,
                     items.dropout, items.cache_in_memory)
