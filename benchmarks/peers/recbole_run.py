"""Train one RecBole 1.2.1 model (sequential, or BPR for our MF) on a PixelRec-format CSV under pixelrec's protocol; print one JSON line.

Runs INSIDE the RecBole virtualenv (benchmarks/peers/make_recbole_venv.sh); imports only recbole, torch,
numpy and pandas. benchmarks/ml100k.py --peer recbole starts it as a subprocess:

    PEER_PYTHON recbole_run.py ml100k.csv --model sasrec [--seed 0] [--epochs 200] [--max-len 20]
                               [--patience 10] [--max-seconds 0]

The protocol (pixelrec's, docs/protocol.md):
- sequences: each user's rows stably sorted by timestamp (ties keep file order). RecBole stores
  timestamps as 32-bit floats, which merges distinct times and reorders some sequences, so the atomic
  file's timestamp is the row's rank in that sort (exact below 2**24 rows);
- leave-one-out by time (RecBole `eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`);
- full ranking over every item, the user's history excluded: RecBole 1.2.1 masks nothing for sequential
  models, so this script scores with the model's `full_sort_predict` and sets to -inf the padding column
  and every item the user interacted with before the target (train items; plus the valid item at test
  time), as pixelrec does;
- max length and dim as pixelrec's defaults (20, 64), CE loss over all items, batch 256, Adam lr 1e-3,
  early stop on valid NDCG@10 after `--patience` epochs without a better one, test metrics at the best
  valid epoch; the model's other settings are RecBole's defaults (SASRec: dropout 0.2/0.2, as the
  figures published with the CSV).
- `--model mf` runs RecBole's BPR (a general recommender, the peer of our MF): BPR loss with one uniform
  negative per (user, item) training pair, batch 2048 (RecBole's), dim 64; its full-sort batches carry
  users only, so each row's held-out item is checked against ours (`check_general_targets`) and the
  same masking applies. `--lr` sets Adam's learning rate (default RecBole's 1e-3).
`--epochs` caps the schedule and `--max-seconds` caps its wall time; the JSON says whether a cap ended it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# our --model -> (RecBole model class, its settings beyond the shared ones)
RECBOLE_MODELS = {
    "sasrec": ("SASRec", {"hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2}),
    "gru4rec": ("GRU4Rec", {}),
    "nextitnet": ("NextItNet", {}),
    "lightsans": ("LightSANs", {}),
    "srgnn": ("SRGNN", {}),
    "bert4rec": ("BERT4Rec", {}),
    # a general recommender: BPR-MF on (user, item) training pairs, one uniform negative each, RecBole's
    # batch 2048; full ranking masked as for the sequential models (evaluate_general)
    "mf": ("BPR", {"loss_type": "BPR", "train_batch_size": 2048,
                   "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1, "alpha": 1.0,
                                             "dynamic": False, "candidate_num": 0}}),
}
K = 10


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows stably sorted by timestamp (ties keep file order) with `order` = rank: pixelrec's sequence order."""
    out = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    out["order"] = np.arange(len(out), dtype=np.int64)
    return out


def histories(df: pd.DataFrame) -> dict[str, list[str]]:
    """user token -> item tokens in sequence order (last = test target, second last = valid target)."""
    rows = ordered(df)
    return {str(u): [str(i) for i in g["item_id"]] for u, g in rows.groupby("user_id", sort=False)}


def write_atomic(df: pd.DataFrame, folder: Path, name: str) -> Path:
    """RecBole's atomic .inter file; the timestamp column holds the exact sequence rank (see module doc)."""
    rows = ordered(df)
    if len(rows) >= 2**24:
        raise SystemExit(f"{len(rows)} rows: ranks would not be exact as RecBole's float32 timestamps")
    path = folder / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame({"user_id:token": rows["user_id"].astype(str), "item_id:token": rows["item_id"].astype(str),
                        "timestamp:float": rows["order"]})
    out.to_csv(path, sep="\t", index=False)
    return path


def mask_history(scores, seen: list[np.ndarray]):
    """Set to -inf, in place, column 0 (RecBole's padding item) and seen[r] of every row r; returns scores."""
    import torch

    scores[:, 0] = -math.inf
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if seen else np.zeros(0, np.int64)
    scores[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = -math.inf
    return scores


def rank_metrics(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (NDCG@10, Recall@10) of one target each: rank = items scored strictly above the target."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    rank = (scores > target_scores).sum(dim=1).cpu().numpy()
    hit = rank < K
    return np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0), hit.astype(float)


def check_inputs(inter, model, seen: list[np.ndarray], targets: list[int]) -> None:
    """RecBole's input sequence must be the last MAX_ITEM_LIST_LENGTH items of our history and its target
    ours: the same split and order as pixelrec's (raises on the first user where they differ)."""
    seqs, lens = inter[model.ITEM_SEQ].cpu().numpy(), inter[model.ITEM_SEQ_LEN].cpu().numpy()
    got_targets = inter[model.ITEM_ID].cpu().numpy()
    for r, hist in enumerate(seen):
        want = np.asarray(hist)[-seqs.shape[1]:]
        if not np.array_equal(seqs[r, :lens[r]], want) or got_targets[r] != targets[r]:
            raise SystemExit(f"row {r}: RecBole's sequence/target differ from pixelrec's split; protocol mismatch")


def check_general_targets(positive_u: np.ndarray, positive_i: np.ndarray, targets: list[int]) -> None:
    """A general model's full-sort batch lists its held-out (row, item) pairs: one per row, ours."""
    order = np.argsort(positive_u, kind="stable")
    if not (np.array_equal(positive_u[order], np.arange(len(targets)))
            and np.array_equal(positive_i[order], np.asarray(targets))):
        raise SystemExit("RecBole's held-out items differ from pixelrec's split; protocol mismatch")


def evaluate(model, loader, dataset, seen_tokens: dict[str, list[str]], back: int) -> tuple[float, float]:
    """Mean NDCG@10 / Recall@10 of one split's loader; `back` = 2 (valid) or 1 (test) items held out."""
    import torch

    model.eval()
    ndcg, recall = [], []
    uid, iid = dataset.uid_field, dataset.iid_field
    sequential = hasattr(model, "ITEM_SEQ")
    with torch.no_grad():
        for batch in loader:
            inter = batch[0].to(model.device)
            users = dataset.id2token(uid, inter[uid].cpu().numpy())
            seen = [dataset.token2id(iid, seen_tokens[str(u)][:-back]) for u in users]
            targets = [dataset.token2id(iid, seen_tokens[str(u)][-back]) for u in users]
            if sequential:
                check_inputs(inter, model, seen, targets)
            else:
                check_general_targets(batch[2].cpu().numpy(), batch[3].cpu().numpy(), targets)
            scores = mask_history(model.full_sort_predict(inter).view(len(users), -1), seen)
            n, r = rank_metrics(scores, torch.as_tensor(targets, dtype=torch.long, device=scores.device))
            ndcg.append(n)
            recall.append(r)
    return float(np.concatenate(ndcg).mean()), float(np.concatenate(recall).mean())


def recbole_config(model: str, args, data_dir: Path, name: str) -> dict:
    cls, extra = RECBOLE_MODELS[model]
    return {
        "model": cls, "dataset": name, "data_path": str(data_dir), "checkpoint_dir": str(data_dir / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len, "hidden_size": args.dim, "embedding_size": args.dim,
        "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "train_batch_size": 256, "eval_batch_size": 256, "learning_rate": args.lr,
        "epochs": args.epochs, "stopping_step": args.patience, "seed": args.seed, "reproducibility": True,
        "use_gpu": False, "show_progress": False, "save_dataset": False, "save_dataloaders": False,
        "metrics": ["Recall", "NDCG"], "topk": [K], "valid_metric": "NDCG@10", **extra,
    }


def run(args) -> dict:
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    df = pd.read_csv(args.csv, dtype={"item_id": str, "user_id": str})
    seen = histories(df)
    with tempfile.TemporaryDirectory(prefix="recbole-peer-") as tmp:
        data_dir, name = Path(tmp), "pixelrec"
        write_atomic(df, data_dir, name)
        os.chdir(tmp)  # RecBole writes log_tensorboard/ and saved/ under the working directory
        config = Config(model=RECBOLE_MODELS[args.model][0], dataset=name,
                        config_dict=recbole_config(args.model, args, data_dir, name))
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"], config["reproducibility"])
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        best, best_epoch, since, times, capped = (-1.0, 0.0, 0.0), -1, 0, [], False
        t_start = time.time()
        for epoch in range(args.epochs):
            t0 = time.time()
            trainer._train_epoch(train_data, epoch, show_progress=False)
            times.append(time.time() - t0)
            valid = evaluate(model, valid_data, dataset, seen, back=2)
            if valid[0] > best[0]:
                test = evaluate(model, test_data, dataset, seen, back=1)
                best, best_epoch, since = (valid[0], *test), epoch, 0
            else:
                since += 1
            print(f"epoch {epoch}: train {times[-1]:.1f}s valid ndcg@10 {valid[0]:.4f} "
                  f"(best {best[0]:.4f} at {best_epoch})", file=sys.stderr, flush=True)
            if since >= args.patience:
                break
            if epoch + 1 == args.epochs or (args.max_seconds and time.time() - t_start > args.max_seconds):
                capped = True
                break
    return {"side": "recbole", "model": args.model, "recbole_model": RECBOLE_MODELS[args.model][0],
            "seed": args.seed, "ndcg@10": round(best[1], 6), "recall@10": round(best[2], 6),
            "valid_ndcg@10": round(best[0], 6), "best_epoch": best_epoch, "epochs": len(times),
            "s_per_epoch": round(float(np.mean(times)), 2), "capped": capped, "epochs_cap": args.epochs,
            "max_len": args.max_len, "dim": args.dim, "patience": args.patience, "lr": args.lr}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="interactions in PixelRec CSV format (item_id,user_id,timestamp)")
    ap.add_argument("--model", required=True, choices=sorted(RECBOLE_MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=200, help="most epochs (the cap)")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after the epoch that passes this (0 = none)")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (RecBole's default 1e-3)")
    args = ap.parse_args(argv)
    for name in ("epochs", "patience", "max_len", "dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    print(json.dumps(run(parse_args())), flush=True)
