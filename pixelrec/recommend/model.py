"""Recommender = item tower + sequence encoder + loss.

A training step gathers the batch's unique item indices (inputs, targets and negatives), runs the
item tower once on them, scatters the vectors back to positions, and scores every position.
Serving uses the same two pieces: all item vectors -> index; user state at the last position.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .batches import left_pad
from .config import LossConfig
from .losses import bpr_loss, expected_draws_log, softmax_loss
from .towers import ItemTower


class Recommender(nn.Module):
    def __init__(self, tower: ItemTower, encoder: nn.Module, max_len: int, loss: LossConfig,
                 popularity: torch.Tensor | None = None):
        super().__init__()
        self.tower = tower
        self.encoder = encoder
        self.max_len = max_len
        self.loss_cfg = loss
        # [num_items + 1] share of training interactions per item, for the log-q correction
        if popularity is None:
            popularity = torch.full((tower.num_items + 1,), 1.0 / max(tower.num_items, 1))
            popularity[0] = 0.0
        self.register_buffer("popularity", popularity.float(), persistent=False)
        # Negatives come only from items with training interactions: an item first seen at test time
        # (a cold item) did not exist while the model trained, so it is never pushed down either.
        self.register_buffer("known_items", torch.nonzero(self.popularity > 0).flatten(), persistent=False)
        position = torch.full((tower.num_items + 1,), -1, dtype=torch.long)
        position[self.known_items] = torch.arange(len(self.known_items))
        self.register_buffer("known_position", position, persistent=False)  # item -> index in known_items

    # ---- forward pieces ----------------------------------------------------------------------
    def states(self, item_vecs: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """item_vecs [B, L, d] of seq [B, L] (left-padded) -> states [B, L, d]."""
        return self.encoder(item_vecs, seq != 0)

    def user_vectors(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, L] left-padded item indices -> user vectors [B, d] (state after the last item).

        item_table [N + 1, d]: precomputed item vectors to look up instead of running the tower
        (evaluation and serving compute the catalogue's vectors once).
        """
        if item_table is not None:
            vecs = item_table[seq]
        else:
            uniq, inv = torch.unique(seq, return_inverse=True)
            vecs = self.tower(uniq)[inv]  # [B, L, d]
        return self.states(vecs, seq)[:, -1]

    @torch.no_grad()
    def encode_histories(self, histories: list[np.ndarray], item_table: torch.Tensor | None = None,
                         batch_size: int = 1024) -> np.ndarray:
        """User vectors [U, d] float32 for a list of item-index histories (most recent last)."""
        device = next(self.parameters()).device
        table = None if item_table is None else item_table.to(device)
        out = []
        for i in range(0, len(histories), batch_size):
            seq = torch.from_numpy(left_pad(histories[i : i + batch_size], self.max_len)).to(device)
            out.append(self.user_vectors(seq, table).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.tower.dim), np.float32)

    # ---- training ----------------------------------------------------------------------------
    def training_loss(self, seq: torch.Tensor, neg: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, trained: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, L + 1] left-padded windows; neg [B, L] BPR negatives (loss bpr only);
        trained [B]: how many of each window's newest targets to train (None = all).

        The recommendation loss plus the item tower's own auxiliary loss, if it has one
        (`ItemTower.auxiliary_loss`, computed over the items of this step)."""
        loss = self.recommendation_loss(seq, neg, generator, trained)
        aux = self.tower.auxiliary_loss()
        return loss if aux is None else loss + aux

    def recommendation_loss(self, seq: torch.Tensor, neg: torch.Tensor | None = None,
                            generator: torch.Generator | None = None,
                            trained: torch.Tensor | None = None) -> torch.Tensor:
        """The next-item loss of `training_loss` alone (bpr or softmax, see LossConfig)."""
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = (inputs != 0) & (targets != 0)  # positions with context and a real target
        if trained is not None:
            L = inputs.shape[1]
            mask &= torch.arange(L, device=seq.device)[None] >= L - trained.to(seq.device)[:, None]
        cfg = self.loss_cfg
        if cfg.loss == "bpr":
            neg = neg.masked_fill(~mask, 0)  # no need to encode negatives of positions without a target
            uniq, inv = torch.unique(torch.cat([seq, neg], 1), return_inverse=True)
            vecs = self.tower(uniq)[inv]  # [B, 2L + 1, d]
            L = inputs.shape[1]
            states = self.states(vecs[:, :L], inputs)
            return bpr_loss(states[mask], vecs[:, 1 : L + 1][mask], vecs[:, L + 1 :][mask])

        if cfg.use_full_softmax(self.tower):
            all_vecs = self.tower(torch.arange(self.tower.num_items + 1, device=seq.device))  # [N + 1, d]
            states = self.states(all_vecs[inputs], inputs)
            # candidates: every item with training interactions (not padding, not cold items)
            return softmax_loss(states[mask], all_vecs[self.known_items], self.known_position[targets[mask]])

        # sampled softmax: candidates = this batch's targets + uniform negatives, log-q corrected
        n_uni = cfg.uniform_negatives()
        known = self.known_items
        pick = torch.randint(0, len(known), (n_uni,), generator=generator).to(known.device)
        uniform = known[pick].to(seq.device)
        pos = targets[mask]
        cand, cand_inv = torch.unique(torch.cat([pos, uniform]), return_inverse=True)
        uniq, inv = torch.unique(torch.cat([inputs.flatten(), cand]), return_inverse=True)
        vecs = self.tower(uniq)
        n_in = inputs.numel()
        states = self.states(vecs[inv[:n_in]].view(*inputs.shape, -1), inputs)
        cand_vecs = vecs[inv[n_in:]]  # [C, d]
        logq = expected_draws_log(cand, self.popularity, len(pos), n_uni, len(known))
        return softmax_loss(states[mask], cand_vecs, cand_inv[: len(pos)], logq)
