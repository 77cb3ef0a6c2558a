"""Train Cornac's VBPR on a PixelRec-format CSV under pixelrec's protocol, reading the item features of a
pixelrec encode cache (the frozen embeddings `pixelrec fit --model vbpr --items frozen` reads); print one
JSON line.

Runs INSIDE the Cornac virtualenv (benchmarks/peers/make_cornac_venv.sh); imports cornac, torch, numpy,
pandas and h5py, and the split / masking / metric helpers of recbole_run.py next to it (which import
nothing else at module level):

    PEER_PYTHON cornac_vbpr.py ml100k.csv CACHE.h5 [--seed 0] [--k 32 --k2 32] [--lr 0.005]
                               [--epochs 100] [--check-every 5] [--patience 2]

The protocol (pixelrec's, as recbole_run.py applies it):
- sequences: each user's rows stably sorted by timestamp (ties keep file order); leave-one-out: the
  last item is the test target, the second last the validation target, the rest trains (users with
  fewer than 3 rows are left out);
- Cornac trains on the (user, item) training pairs with the cache's embedding of each item as its
  image feature (float32 of the stored values, not normalised);
- full ranking over every item of the CSV, the user's earlier items set to -inf (train items; plus
  the valid item at test time); an item Cornac cannot score (no training row: Cornac's VBPR keeps no
  vector for it) scores -inf, so a test target among them counts as a miss;
- early stopping: Cornac's VBPR has none, so training runs in chunks of --check-every epochs, each
  continuing from the last chunk's parameters (Adam's moments restart per chunk; shuffling seeded by
  --seed + epochs done), validation NDCG@10
  after each; test metrics of the best validation chunk; stop after --patience chunks without a
  better one or at --epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recbole_run import K, histories, mask_history, rank_metrics  # noqa: E402

PARAMS = {"Bi": "beta_item", "Gu": "gamma_user", "Gi": "gamma_item", "Tu": "theta_user", "E": "emb_matrix",
          "Bp": "beta_prime"}  # Cornac's init_params keys -> the fitted model's attributes


def read_features(cache: str, items: list[str]) -> np.ndarray:
    """[len(items), d] float32 embeddings of `items` from a pixelrec cache; exits naming a missing item."""
    import h5py

    with h5py.File(cache, "r") as f:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["item_ids"][:]]
        emb = f["embeddings"][:].astype(np.float32)
    where = {item: r for r, item in enumerate(ids)}
    missing = [i for i in items if i not in where]
    if missing:
        raise SystemExit(f"{cache}: no embedding for item {missing[0]!r} ({len(missing)} items missing)")
    return emb[[where[i] for i in items]]


def split(seqs: dict[str, list[str]]):
    """(train (user, item, 1.0) triplets, {user: history}) of the users with 3 or more items."""
    kept = {u: h for u, h in seqs.items() if len(h) >= 3}
    train = [(u, i, 1.0) for u, h in kept.items() for i in h[:-2]]
    return train, kept


def evaluate(model, train_set, users: dict[str, list[str]], items: list[str], back: int) -> tuple[float, float]:
    """Mean NDCG@10 / Recall@10 over `users` of the item `back` places from the end (2 valid, 1 test)."""
    import torch

    col = {item: c for c, item in enumerate(items)}
    known = np.array([train_set.iid_map.get(i, -1) for i in items])  # our column -> Cornac's item index
    ndcg, recall = [], []
    names = list(users)
    for start in range(0, len(names), 512):
        batch = names[start:start + 512]
        scores = np.full((len(batch), len(items) + 1), -np.inf, dtype=np.float64)  # column 0: padding
        for r, u in enumerate(batch):
            s = np.asarray(model.score(train_set.uid_map[u]), dtype=np.float64)
            ok = (known >= 0) & (known < len(s))
            scores[r, 1:][ok] = s[known[ok]]
        seen = [np.array([col[i] + 1 for i in users[u][:-back]], dtype=np.int64) for u in batch]
        targets = torch.as_tensor([col[users[u][-back]] + 1 for u in batch], dtype=torch.long)
        n, rc = rank_metrics(mask_history(torch.as_tensor(scores), seen), targets)
        ndcg.append(n)
        recall.append(rc)
    return float(np.concatenate(ndcg).mean()), float(np.concatenate(recall).mean())


def fitted_params(model) -> dict:
    return {key: getattr(model, attr) for key, attr in PARAMS.items()}


def run(args) -> dict:
    import cornac
    from cornac.data import ImageModality
    from cornac.eval_methods import BaseMethod

    df = pd.read_csv(args.csv, dtype={"item_id": str, "user_id": str})
    train, users = split(histories(df))
    items = sorted(df["item_id"].unique().tolist())
    feats = read_features(args.cache, items)
    method = BaseMethod.from_splits(train_data=train, test_data=[(u, h[-1], 1.0) for u, h in users.items()],
                                    exclude_unknowns=True, seed=args.seed, verbose=False,
                                    item_image=ImageModality(features=feats, ids=items, normalized=True))
    train_set = method.train_set
    best, best_epoch, since, epochs, t0 = (-1.0, 0.0, 0.0), -1, 0, 0, time.time()
    init = None
    while epochs < args.epochs:
        chunk = min(args.check_every, args.epochs - epochs)
        model = cornac.models.VBPR(k=args.k, k2=args.k2, n_epochs=chunk, batch_size=args.batch_size,
                                   learning_rate=args.lr, lambda_w=args.lambda_w, lambda_b=args.lambda_b,
                                   lambda_e=args.lambda_e, use_gpu=False, verbose=False, seed=args.seed + epochs,
                                   init_params=init)
        with contextlib.redirect_stdout(sys.stderr):  # Cornac prints "Optimization finished!"; stdout is the JSON
            model.fit(train_set)
        epochs += chunk
        init = fitted_params(model)
        valid = evaluate(model, train_set, users, items, back=2)
        if valid[0] > best[0]:
            best, best_epoch, since = (valid[0], *evaluate(model, train_set, users, items, back=1)), epochs, 0
        else:
            since += 1
        print(f"epochs {epochs}: valid ndcg@10 {valid[0]:.4f} (best {best[0]:.4f} at {best_epoch}: test ndcg@10 "
              f"{best[1]:.4f} recall@10 {best[2]:.4f}) {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if since >= args.patience:
            break
    return {"side": "cornac", "model": "vbpr", "cornac": cornac.__version__, "seed": args.seed,
            "ndcg@10": round(best[1], 6), "recall@10": round(best[2], 6), "valid_ndcg@10": round(best[0], 6),
            "best_epoch": best_epoch, "epochs": epochs, "epochs_cap": args.epochs, "k": args.k, "k2": args.k2,
            "lr": args.lr, "users": len(users), "items": len(items), "feature_dim": int(feats.shape[1]),
            "cold_test_targets": int(sum(train_set.iid_map.get(h[-1]) is None for h in users.values())),
            "wall_s": round(time.time() - t0, 1), "metric_k": K}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="interactions in PixelRec CSV format (item_id,user_id,timestamp)")
    ap.add_argument("cache", help="pixelrec encode cache (its `embeddings` are the item features)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=32, help="latent factors (with --k2: pixelrec's dim 64)")
    ap.add_argument("--k2", type=int, default=32, help="visual factors")
    ap.add_argument("--lr", type=float, default=0.005, help="Cornac's default")
    ap.add_argument("--lambda-w", type=float, default=0.01)
    ap.add_argument("--lambda-b", type=float, default=0.01)
    ap.add_argument("--lambda-e", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=100, help="Cornac's default")
    ap.add_argument("--epochs", type=int, default=100, help="most epochs (the cap)")
    ap.add_argument("--check-every", type=int, default=5, help="epochs between validations")
    ap.add_argument("--patience", type=int, default=2, help="validations without a better one before stopping")
    args = ap.parse_args(argv)
    for name in ("epochs", "check_every", "patience", "k", "k2", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    print(json.dumps(run(parse_args())), flush=True)
