"""Recommender = item tower + sequence encoder + loss.

A training step gathers the batch's unique item indices (inputs, targets and negatives), runs the
item tower once on them, scatters the vectors back to positions, and scores every position.
Serving uses the same two pieces: all item vectors -> index; user state at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..distributed import World
from .batches import cloze_masks, context_slots, left_pad
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
        # With `negatives_from="all"` (the PixelRec code) every catalogue item is a candidate.
        pool = self.popularity > 0
        if loss.negatives_from == "all":
            pool = torch.arange(tower.num_items + 1) > 0
        self.register_buffer("known_items", torch.nonzero(pool).flatten(), persistent=False)
        position = torch.full((tower.num_items + 1,), -1, dtype=torch.long)
        position[self.known_items] = torch.arange(len(self.known_items))
        self.register_buffer("known_position", position, persistent=False)  # item -> index in known_items

    # ---- forward pieces ----------------------------------------------------------------------
    def states(self, item_vecs: torch.Tensor, seq: torch.Tensor, users: torch.Tensor | None = None,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
        """item_vecs [B, L, d] of seq [B, L] (left-padded) -> states [B, L, d]. An encoder that marks
        `reads_items` (SR-GNN: repeated items are one graph node) also gets the item indices; one that
        marks `reads_users` (MF, VBPR: a learned vector per training user) gets the user indices [B].
        hidden [B, L] (the cloze and context objectives' training): the slots the encoder hides behind
        its mask vector (cloze), or computes from the window's other items (context). Without it a cloze encoder (BERT4Rec) appends a mask slot after the history and returns
        [B, L + 1, d], so the last state is the user vector as for every model."""
        if hidden is not None:
            return self.encoder(item_vecs, seq != 0, hidden)
        if getattr(self.encoder, "reads_users", False):
            if getattr(self.encoder, "reads_items", False):  # ACF: the history's cached tokens too
                return self.encoder(item_vecs, seq != 0, users, seq)
            return self.encoder(item_vecs, seq != 0, users)
        if getattr(self.encoder, "reads_items", False):
            return self.encoder(item_vecs, seq != 0, seq)
        return self.encoder(item_vecs, seq != 0)

    def user_vectors(self, seq: torch.Tensor, item_table: torch.Tensor | None = None,
                     users: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, L] left-padded item indices -> user vectors [B, d] (state after the last item).

        item_table [N + 1, d]: precomputed item vectors to look up instead of running the tower
        (evaluation and serving compute the catalogue's vectors once).
        """
        if item_table is not None:
            vecs = item_table[seq]
        else:
            uniq, inv = torch.unique(seq, return_inverse=True)
            vecs = self.tower(uniq)[inv]  # [B, L, d]
        return self.states(vecs, seq, users)[:, -1]

    @torch.no_grad()
    def encode_histories(self, histories: list[np.ndarray], item_table: torch.Tensor | None = None,
                         batch_size: int = 1024, users: np.ndarray | None = None) -> np.ndarray:
        """User vectors [U, d] float32 for a list of item-index histories (most recent last).

        users [U]: the training user index of each history (-1 = not a training user), read only by an
        encoder with a vector per training user (MF, VBPR): a training user gets its learned vector, any
        other history is folded in (`recommend.foldin`)."""
        if getattr(self.encoder, "reads_users", False):
            from .foldin import user_vectors_of

            return user_vectors_of(self, histories, users, item_table)
        device = next(self.parameters()).device
        table = None if item_table is None else item_table.to(device)
        out = []
        for i in range(0, len(histories), batch_size):
            seq = torch.from_numpy(left_pad(histories[i : i + batch_size], self.max_len)).to(device)
            out.append(self.user_vectors(seq, table).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.tower.dim), np.float32)

    # ---- training ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The training loss (`training_loss`), so DistributedDataParallel can wrap the model."""
        return self.training_loss(*args, **kwargs)

    def training_loss(self, seq: torch.Tensor, neg: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, trained: torch.Tensor | None = None, *,
                      uniform: torch.Tensor | None = None, share: "BatchShare | None" = None,
                      users: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, L + 1] left-padded windows; neg [B, L] BPR negatives (loss bpr only; [B, L + 1] for
        cloze); users [B]: the windows' user indices (encoders that read them, MF and VBPR); hidden
        [B, L + 1]: the cloze / context objectives' target slots (`draw_hidden`; None for the others);
        trained [B]: how many of each window's newest targets to train (None = all); uniform: the
        sampled softmax's uniform negatives (drawn from `generator` when not given);
        share: this process's part of a larger global batch (distributed training), None = all of it.

        The recommendation loss plus the item tower's own auxiliary loss, if it has one
        (`ItemTower.auxiliary_loss`, computed over the items of this step)."""
        loss = self.recommendation_loss(seq, neg, generator, trained, uniform=uniform, share=share, users=users,
                                        hidden=hidden)
        aux = self.tower.auxiliary_loss()
        return loss if aux is None else loss + aux

    def draw_hidden(self, seq: torch.Tensor, trained: torch.Tensor, generator: torch.Generator | None
                    ) -> torch.Tensor | None:
        """The slots of windows seq [B, L + 1] a cloze step hides (`batches.cloze_masks` with the
        encoder's mask_ratio and mask_last), or those a context step trains (`batches.context_slots`:
        every item, from the window's other items); None for the next-item objectives."""
        objective = getattr(self.encoder, "objective", None)
        if objective == "context":  # FM / DSSM --context window: every item, from the window's others
            return context_slots(seq, trained)
        if objective != "cloze":
            return None
        return cloze_masks(seq, trained, self.encoder.mask_ratio, self.encoder.mask_last, generator)

    def draw_uniform_negatives(self, generator: torch.Generator | None) -> torch.Tensor | None:
        """The sampled softmax's uniform negatives for one step (None for bpr and full softmax)."""
        cfg = self.loss_cfg
        if cfg.loss == "bpr" or cfg.use_full_softmax(self.tower):
            return None
        known = self.known_items
        pick = torch.randint(0, len(known), (cfg.uniform_negatives(),), generator=generator).to(known.device)
        return known[pick]

    def recommendation_loss(self, seq: torch.Tensor, neg: torch.Tensor | None = None,
                            generator: torch.Generator | None = None, trained: torch.Tensor | None = None, *,
                            uniform: torch.Tensor | None = None, share: "BatchShare | None" = None,
                            users: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The recommendation loss of `training_loss` alone (bpr or softmax, see LossConfig), for every
        objective (`Targets`): next item (causal, prefix) or the items of the drawn slots (cloze, context).

        Averaged over the trained positions, or with `mean_over="sequences"` (the PixelRec code)
        summed over each window's positions and averaged over the windows. With `share` (distributed
        training) this process holds part of a global batch: its positions are summed and divided by
        the global batch's count of positions (or windows), times the world size, as DDP averages
        gradients, and the item tower, unless cheap, encodes
        each unique item of the whole batch once, in shares (`BatchShare.vectors`), so W processes
        compute one process's gradient with 1/W of its item-encoding work each."""
        goal = Targets.of(seq, trained, hidden)
        inputs, targets, mask = goal.inputs(seq), goal.targets(seq), goal.mask  # [B, n] each
        cfg = self.loss_cfg
        per_window = cfg.mean_over == "sequences"
        reduction = "sum" if share is not None or per_window else "mean"
        if cfg.loss == "bpr":
            neg = neg.masked_fill(~mask, 0)  # no need to encode negatives of positions without a target
            vecs = self._vectors(torch.cat([seq, neg], 1), share, share and share.bpr_items())  # [B, W + n, d]
            W = seq.shape[1]
            states = self.states(vecs[:, : inputs.shape[1]], inputs, users, goal.hidden)
            loss = bpr_loss(states[mask], vecs[:, goal.shift : W][mask], vecs[:, W:][mask], reduction)
        elif cfg.use_full_softmax(self.tower):
            all_vecs = self.tower(torch.arange(self.tower.num_items + 1, device=seq.device))  # [N + 1, d]
            states = self.states(all_vecs[inputs], inputs, users, goal.hidden)
            # candidates: every item with training interactions (not padding, not cold items)
            loss = softmax_loss(states[mask], all_vecs[self.known_items], self.known_position[targets[mask]],
                                reduction=reduction)
        else:
            loss = self._sampled_softmax(goal, inputs, targets, generator, uniform, share, reduction, users)
        if share is None:
            return loss / len(seq) if per_window else loss
        return loss * share.world.size / max(len(share.seq) if per_window else share.positions, 1)

    def _vectors(self, items: torch.Tensor, share: "BatchShare | None", batch_items: torch.Tensor | None
                 ) -> torch.Tensor:
        """Item vectors of `items` [...] (any shape): the tower on their unique items, or, for a costly
        tower in distributed training, rows of the whole batch's `batch_items` encoded in shares."""
        if share is None or self.tower.cheap:
            uniq, inv = torch.unique(items, return_inverse=True)
            return self.tower(uniq)[inv]
        batch_items = batch_items.to(items.device)
        return share.vectors(batch_items, self.tower)[torch.searchsorted(batch_items, items)]

    def _sampled_softmax(self, goal, inputs, targets, generator, uniform, share, reduction, users=None) -> torch.Tensor:
        """Candidates = the (global) batch's targets + uniform negatives, logits log-q corrected."""
        mask = goal.mask
        if uniform is None:
            uniform = self.draw_uniform_negatives(generator)
        uniform = uniform.to(inputs.device)
        pos = targets[mask]  # [P] this process's positives
        batch_pos = pos if share is None else share.targets.to(inputs.device)  # the whole batch's
        cand = torch.unique(torch.cat([batch_pos, uniform]))  # [C] sorted
        labels = torch.searchsorted(cand, pos)  # this process's positives among the candidates
        batch_items = None
        if share is not None:  # every item the whole batch encodes: its windows' inputs and the candidates
            batch_items = torch.unique(torch.cat([goal.inputs(share.seq).flatten().to(cand.device), cand]))
        vecs = self._vectors(torch.cat([inputs.flatten(), cand]), share, batch_items)
        n_in = inputs.numel()
        item_vecs, cand_vecs = vecs[:n_in].view(*inputs.shape, -1), vecs[n_in:]  # [B, L, d], [C, d]
        states = self.states(item_vecs, inputs, users, goal.hidden)
        logq = expected_draws_log(cand, self.popularity, len(batch_pos), len(uniform), len(self.known_items))
        return softmax_loss(states[mask], cand_vecs, labels, logq, reduction=reduction)


@dataclass
class Targets:
    """What a training batch of windows seq [B, W] predicts, under every objective: the states of
    `inputs(seq)` = seq[:, :W - shift] at the `mask` [B, n] positions predict `targets(seq)[mask]`.

    shift 1, the causal and prefix objectives: position t predicts the item at t + 1 (`trained_positions`);
    shift 0, cloze: a hidden slot predicts its own item, `hidden` [B, W] being the slots whose item the
    encoder replaces by its mask vector; context (FM / DSSM --context window): likewise, `hidden` being
    the slots whose state the encoder computes from the window's other items."""

    shift: int
    mask: torch.Tensor
    hidden: torch.Tensor | None = None

    @classmethod
    def of(cls, seq: torch.Tensor, trained: torch.Tensor | None, hidden: torch.Tensor | None) -> "Targets":
        if hidden is None:
            return cls(1, trained_positions(seq, trained))
        hidden = hidden.to(seq.device) & (seq != 0)
        return cls(0, hidden, hidden)

    def inputs(self, seq: torch.Tensor) -> torch.Tensor:
        return seq[:, : seq.shape[1] - self.shift]

    def targets(self, seq: torch.Tensor) -> torch.Tensor:
        return seq[:, self.shift :]


def trained_positions(seq: torch.Tensor, trained: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] the positions of windows seq [B, L + 1] that train a target: those with context and a real
    target, and among them only the newest `trained` [B] of each window (None = all)."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = (inputs != 0) & (targets != 0)
    if trained is not None:
        L = inputs.shape[1]
        mask &= torch.arange(L, device=seq.device)[None] >= L - trained.to(seq.device)[:, None]
    return mask


@dataclass
class BatchShare:
    """One process's part of a global training batch (distributed data parallel training).

    seq [B, L + 1], trained [B], neg [B, L] or None, hidden [B, L + 1] or None (cloze): the whole
    global batch, which every process holds (its own part is a slice of it); world: the processes sharing it.
    """

    seq: torch.Tensor
    trained: torch.Tensor
    neg: torch.Tensor | None
    world: World
    hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        goal = Targets.of(self.seq, self.trained, self.hidden)
        self.mask = goal.mask  # [B, n] the whole batch's trained positions
        self.positions = int(self.mask.sum())  # the loss's normaliser
        self.targets = goal.targets(self.seq)[self.mask]  # the sampled softmax's in-batch candidates, batch order

    def bpr_items(self) -> torch.Tensor:
        """The unique items a bpr step of the whole batch encodes (windows + negatives of trained positions)."""
        neg = self.neg.masked_fill(~self.mask, 0)
        return torch.unique(torch.cat([self.seq, neg], 1))

    def vectors(self, items: torch.Tensor, tower: ItemTower) -> torch.Tensor:
        """tower(items) [C, d], each process encoding its contiguous share and all of them gathered
        with autograd, so the gradient of every row flows back to the process that encoded it."""
        spans = [self.world.span_of(len(items), r) for r in range(self.world.size)]
        lo, hi = spans[self.world.rank]
        mine = tower(items[lo:hi])  # [hi - lo, d]
        width = max(b - a for a, b in spans)
        padding = mine.new_zeros(width - len(mine), mine.shape[-1])
        parts = self.world.gather_with_grad(torch.cat([mine, padding]))  # every process's rows, padded alike
        return torch.cat([part[: b - a] for part, (a, b) in zip(parts, spans)])
