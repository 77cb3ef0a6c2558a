"""Fold-in: a user vector for a history whose user has no learned vector (MF, VBPR).

MF and VBPR learn one vector per training user. For any other history (`retrieve --history`, `serve`
with a history, a user who arrived after training) the user vector is solved for with the item
vectors fixed: the training objective's full softmax, each history item a positive against every
catalogue item, plus an L2 penalty, minimised by `FOLD_IN_STEPS` steps of Adam from the zero vector:

    min_u  mean_{h in history} -log softmax(V u + V_tail t)_h  +  FOLD_IN_L2 * |u|^2

(V: the item vectors' learned coordinates, V_tail t: the fixed ones, VBPR's visual bias times 1).
Every history is solved on its own (Adam's updates are per coordinate, so no history changes
another's vector) and the steps are the same on every call: the same history always gets the same
vector on one device. A training user folded in from their training items ranks close to their
learned vector (tests/test_nonsequential.py measures the top-10 overlap).
"""

from __future__ import annotations

import numpy as np
import torch

FOLD_IN_STEPS = 60
FOLD_IN_LR = 0.1
# The penalty sets how far the solution moves from the softmax gradient's first direction (the history's
# mean item vector against the catalogue's); on tests/test_nonsequential.py's MF run the top-10 overlap
# with the learned vectors was 0.65 / 0.68 / 0.74 / 0.83 at 0.01 / 0.03 / 0.1 / 0.3 (a random vector: 0.38)
FOLD_IN_L2 = 0.1


def user_vectors_of(model, histories: list[np.ndarray], users: np.ndarray | None,
                    item_table: torch.Tensor | None = None, batch_size: int = 256) -> np.ndarray:
    """[U, d] float32: the learned vector of each training user (users[i] in 0 .. num_users - 1), the
    folded-in one of every other history (users None or users[i] = -1)."""
    encoder = model.encoder
    device = next(model.parameters()).device
    table = (model.tower.all_vectors() if item_table is None else item_table).to(device).float()
    users = np.full(len(histories), -1, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    if len(users) != len(histories):
        raise ValueError(f"{len(users)} user indices for {len(histories)} histories")
    if hasattr(encoder, "user_vectors"):  # ACF: the user vector also attends over the history (models/acf.py)
        return encoder.user_vectors(table, histories, users, model.max_len)
    out = np.zeros((len(histories), table.shape[1]), dtype=np.float32)
    known = (users >= 0) & (users < encoder.num_users)
    if known.any():
        with torch.no_grad():
            learned = encoder.user_embedding.weight[torch.from_numpy(users[known]).to(device)]
            out[known] = encoder.complete(learned).float().cpu().numpy()
    rest = np.flatnonzero(~known)
    for i in range(0, len(rest), batch_size):
        rows = rest[i : i + batch_size]
        out[rows] = fold_in(table, [histories[r] for r in rows], encoder.fixed_tail).cpu().numpy()
    return out


def fold_in(table: torch.Tensor, histories: list[np.ndarray], fixed_tail: tuple[float, ...] = (),
            steps: int = FOLD_IN_STEPS, lr: float = FOLD_IN_LR, l2: float = FOLD_IN_L2) -> torch.Tensor:
    """User vectors [U, d] for histories of item indices into `table` [N + 1, d] (row 0 = padding, never a
    candidate); the last len(fixed_tail) coordinates are those constants. An empty history gets the
    zero vector (with the fixed tail)."""
    device, d = table.device, table.shape[1]
    t = len(fixed_tail)
    free, tail = table[1:, : d - t], table[1:, d - t :]  # candidates: every real item
    tail_scores = tail @ tail.new_tensor(fixed_tail) if t else None  # [N]
    weights = torch.zeros(len(histories), len(free), device=device)  # [U, N]: each history item's share
    for row, hist in enumerate(histories):
        hist = torch.as_tensor(np.asarray(hist, dtype=np.int64), device=device)
        hist = hist[(hist > 0) & (hist < len(table))] - 1
        if len(hist):
            weights[row].index_add_(0, hist, torch.full((len(hist),), 1.0 / len(hist), device=device))
    u = torch.zeros(len(histories), d - t, device=device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = u @ free.T if tail_scores is None else u @ free.T + tail_scores
            loss = -(weights * torch.log_softmax(logits, -1)).sum() + l2 * (u * u).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    u = u.detach()
    u[weights.sum(1) == 0] = 0.0
    return torch.cat([u, u.new_tensor(fixed_tail).expand(len(u), t)], 1) if t else u
