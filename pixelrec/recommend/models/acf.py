"""ACF, attentive collaborative filtering (Chen et al. 2017; the PixelRec reference's ViNet/acf.py).

The item vector p_i is the item tower's (an ID embedding by default, as in the reference). The user is

    u = e_u + sum_j alpha_j p_j,   alpha = softmax_j(w . ReLU(W_u e_u + W_p p_j + W_x x_j))

over the history items j, with e_u a learned vector per training user and x_j the component-level
attention over the cached TOKEN features of item j (`pixelrec encode --split-block K` caches the T
tokens entering the last K blocks; the reference uses the 7 x 7 cells of ResNet-50's last map):

    x_j = sum_l beta_l t_jl,   beta = softmax_l(w' . ReLU(W'_u e_u + W'_t t_jl)),   t_jl = P token_jl

(P: a learned projection of the token width to --dim). The score is <u, p_i>: one user vector, one
item vector, so the FAISS index serves it unchanged. Training is causal, as for FM and DSSM: the state
at position t attends over the history items up to t and predicts the item after it (the reference
attends over the chunk minus the target, items after it included).

The cached tokens of every vocabulary item are a buffer of the model (float16, saved with the run, so
`retrieve` and `serve` need no cache): N x T x W x 2 bytes, 3.5 MB on ML-100K's 1,682 items with 17 x
64 tokens. Users without a learned e_u (`retrieve --history`, `serve` with a history) are folded in as
MF's are (recommend/foldin.py's steps, learning rate and penalty): e_u is solved for by Adam with the
item vectors and the attention fixed, each next history item a positive of the causal state before it
against every catalogue item.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import PixelrecError
from ..batches import left_pad
from ..config import SequenceConfig


class ACF(nn.Module):
    reads_users = True  # Recommender passes the user indices [B] ...
    reads_items = True  # ... and the history's item indices [B, L] (their cached tokens)
    fixed_tail: tuple[float, ...] = ()

    def __init__(self, cfg: SequenceConfig, num_users: int):
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.user_embedding = nn.Embedding(max(num_users, 1), d)
        nn.init.normal_(self.user_embedding.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.item_user = nn.Linear(d, d)  # W_u
        self.item_vec = nn.Linear(d, d, bias=False)  # W_p
        self.item_feat = nn.Linear(d, d, bias=False)  # W_x
        self.item_score = nn.Linear(d, 1, bias=False)  # w
        self.comp_user = nn.Linear(d, d)  # W'_u
        self.comp_token = nn.Linear(d, d, bias=False)  # W'_t
        self.comp_score = nn.Linear(d, 1, bias=False)  # w'
        self.register_buffer("tokens", torch.zeros(0, 0, 0, dtype=torch.float16))  # [N + 1, T, W]
        self.token_proj: nn.Linear | None = None  # P: W -> d, made with the tokens

    @property
    def num_users(self) -> int:
        return self.user_embedding.num_embeddings

    def attach_tokens(self, tokens: torch.Tensor) -> None:
        """The cached tokens [N + 1, T, W] of every vocabulary item (row 0 = padding), and P for their width."""
        self.tokens = tokens.to(torch.float16)
        if self.token_proj is None or self.token_proj.in_features != tokens.shape[-1]:
            self.token_proj = nn.Linear(tokens.shape[-1], self.dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved run: size the token buffer and P from the checkpoint before they load (children load after)
        saved = state_dict.get(prefix + "tokens")
        if saved is not None and saved.shape != self.tokens.shape:
            self.attach_tokens(torch.zeros_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def complete(self, free: torch.Tensor) -> torch.Tensor:
        return free

    # ---- the user vector ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """States [B, L, d]: at position t the user vector over the history items at positions <= t."""
        if users is None:
            raise ValueError("ACF needs the user index of every window")
        return self.states_of(x, mask, items, self.drop(self.user_embedding(users)))

    def states_of(self, x: torch.Tensor, mask: torch.Tensor, items: torch.Tensor, e_u: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] item vectors of items [B, L] (mask: real items), e_u [B, d] -> causal states [B, L, d]."""
        alpha = self.item_attention(x, mask, items, e_u)  # [B, L(t), L(j)]
        return e_u[:, None] + alpha @ x

    def item_attention(self, x: torch.Tensor, mask: torch.Tensor, items: torch.Tensor, e_u: torch.Tensor
                       ) -> torch.Tensor:
        """alpha [B, L, L]: row t = softmax over the real items j <= t (zero rows where there is none)."""
        feats = self.component_features(items, e_u)  # [B, L, d]
        logit = self.item_score(torch.relu(self.item_user(e_u)[:, None] + self.item_vec(x) + self.item_feat(feats)))
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & mask[:, None, :]  # [B, t, j]
        logits = logit.squeeze(-1)[:, None, :].expand(-1, L, -1).masked_fill(~allowed, float("-inf"))
        return torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)  # a row with no real item: all zero

    def component_attention(self, items: torch.Tensor, e_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """beta [B, L, T] over each history item's tokens, and the projected tokens [B, L, T, d]."""
        if self.token_proj is None:
            raise PixelrecError("--model acf was built without cached tokens")
        tokens = self.token_proj(self.tokens[items].float())  # [B, L, T, d]
        logit = self.comp_score(torch.relu(self.comp_user(e_u)[:, None, None] + self.comp_token(tokens)))
        return torch.softmax(logit.squeeze(-1), -1), tokens

    def component_features(self, items: torch.Tensor, e_u: torch.Tensor) -> torch.Tensor:
        beta, tokens = self.component_attention(items, e_u)
        return (beta[..., None] * tokens).sum(-2)  # [B, L, d]

    # ---- serving: learned users and folded-in histories (recommend.foldin.user_vectors_of) ----
    def user_vectors(self, table: torch.Tensor, histories: list[np.ndarray], users: np.ndarray, max_len: int,
                     batch_size: int = 256) -> np.ndarray:
        """[U, d]: the last state of each history, with the learned e_u of training users (users[i] >= 0) and
        a folded-in e_u for the others."""
        from ..foldin import FOLD_IN_L2, FOLD_IN_LR, FOLD_IN_STEPS

        device = table.device
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        known = (users >= 0) & (users < self.num_users)
        for i in range(0, len(histories), batch_size):
            rows = np.arange(i, min(i + batch_size, len(histories)))
            seq = torch.from_numpy(left_pad([histories[r] for r in rows], max_len)).to(device)
            e_u = torch.zeros(len(rows), self.dim, device=device)
            learned = known[rows]
            if learned.any():
                with torch.no_grad():
                    e_u[torch.from_numpy(learned).to(device)] = self.user_embedding.weight[
                        torch.from_numpy(users[rows][learned]).to(device)]
            if (~learned).any():
                fold = torch.from_numpy(~learned).to(device)
                e_u[fold] = self.fold_in(table, seq[fold], FOLD_IN_STEPS, FOLD_IN_LR, FOLD_IN_L2)
            with torch.no_grad():
                out[rows] = self.states_of(table[seq], seq != 0, seq, e_u)[:, -1].float().cpu().numpy()
        return out

    def fold_in(self, table: torch.Tensor, seq: torch.Tensor, steps: int, lr: float, l2: float) -> torch.Tensor:
        """e_u [U, d] for left-padded histories seq [U, L]: Adam from zero on the training objective's full
        softmax (each history item after the first a positive of the state before it) + l2 |e_u|^2. A history
        of one item has no such pair and keeps e_u = 0 (the user is then that item's vector)."""
        x, mask, free = table[seq], seq != 0, table[1:]
        pairs = mask[:, :-1] & mask[:, 1:]  # state at t predicts the item at t + 1
        counts = pairs.sum(1, keepdim=True).clamp(min=1)
        e_u = torch.zeros(len(seq), self.dim, device=table.device, requires_grad=True)
        opt = torch.optim.Adam([e_u], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                states = self.states_of(x, mask, seq, e_u)[:, :-1]  # [U, L - 1, d]
                logp = torch.log_softmax(states @ free.T, -1)  # [U, L - 1, N]
                target = (seq[:, 1:] - 1).clamp(min=0)
                nll = -logp.gather(-1, target[..., None]).squeeze(-1)
                loss = ((nll * pairs) / counts).sum() + l2 * (e_u * e_u).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return e_u.detach()


# The token layer the cost rule assumes (its real shape is the cache's): ViT-B/32's 50 tokens of width 768
COST_TOKENS, COST_WIDTH = 50, 768


def token_macs(cfg: SequenceConfig) -> float:
    """Forward work per window position (losses.sequence_macs) over COST_TOKENS x COST_WIDTH tokens: the
    projection P and the component attention over one item's tokens, the item attention's maps, the
    per-window maps of e_u shared by the window's positions, and the causal weighted sum."""
    d, L, T, W = cfg.dim, cfg.max_len, COST_TOKENS, COST_WIDTH
    return T * W * d + T * d * d + T * d + 2 * d * d + 2 * d * d / L + d + L * d


def attach_acf_tokens(encoder: ACF, cfg, data) -> None:
    """Read the cached tokens of every vocabulary item from `--cache` into the encoder; refused in one line
    when the cache has no tokens or misses items with interactions."""
    from ...encode.cache import open_cache

    cache = open_cache(cfg.items.cache)
    if not cache.has_tokens:
        raise PixelrecError(f"{cfg.items.cache} holds pooled embeddings only; --model acf attends over each item's "
                            f"cached tokens: encode the covers with `pixelrec encode --images COVERS --out CACHE.h5 "
                            f"--split-block 1`")
    rows = cache.rows_for(data.item_ids[1:])
    if (rows < 0).any():
        example = ", ".join(map(str, data.item_ids[1:][rows < 0][:3]))
        raise PixelrecError(f"{cfg.items.cache}: {int((rows < 0).sum())} of {data.num_items} items of "
                            f"{cfg.interactions} have no cached tokens (e.g. {example}); --model acf reads every "
                            f"item's: encode their covers with `pixelrec encode --images COVERS --out CACHE.h5 "
                            f"--split-block 1`")
    T, W = cache.token_shape
    tokens = torch.zeros(data.num_items + 1, T, W, dtype=torch.float16)
    tokens[1:] = torch.from_numpy(np.asarray(cache.read_tokens(rows), dtype=np.float16))
    encoder.attach_tokens(tokens)
