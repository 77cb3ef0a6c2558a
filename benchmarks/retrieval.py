"""Retrieval benchmark: FAISS indexes vs torch brute-force full ranking.

For each catalogue size N (and dimension d) it builds synthetic clustered item and user vectors,
gives every user a history of items from their own cluster (excluded from the results, as in
evaluation), and measures queries/s, build time, serialized index size and recall@k against the
exact Flat top-k for:

- torch brute force, full stable sort (`brute_force_search`, the exact reference);
- torch brute force with topk instead of a full sort (what PixelRec-style evaluation loops do);
- FAISS Flat through `ItemIndex.search` (exact) and each approximate spec of `--specs`.

Brute force is timed on a subset of users when N is large (`--bf-budget` = users x items scored);
queries/s are per-query rates, so they compare directly. Example:

    python benchmarks/retrieval.py --items 10000,100000 --dim 64 --users 10000 --k 10

`--target-recall R` runs the tuner of `pixelrec index --target-recall` (`pixelrec.index.tuning`)
instead: on each size it samples `--tune-sample` users (half tuning, half held out), tries the
default candidates (or `--tune-specs`) and prints the chosen index, or the best one found, and the
whole frontier (recall vs speed-up over Flat of every measured setting). Default size 1M:

    python benchmarks/retrieval.py --target-recall 0.95 --k 10
    python benchmarks/retrieval.py --target-recall 0.95 --tune-specs HNSW32   # plain HNSW at 1M too

`--vectors fitted:RUN_DIR` replaces the synthetic clusters by vectors with a trained model's
structure: Gaussian mixtures fitted to the run's item vectors (32 components) and to its users'
vectors (8 components), sampled to the catalogue size. Trained vectors differ from the synthetic
clusters where it matters for approximate search: item norms vary (popular items are longer) and
user vectors share a strong common direction. For example, with SASRec trained on ML-100K:

    pixelrec fit --interactions ml100k.csv --out runs/ml100k
    python benchmarks/retrieval.py --target-recall 0.95 --vectors fitted:runs/ml100k
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from pixelrec.index import tuning
from pixelrec.index.faiss_index import ItemIndex, brute_force_search, split_ip_to_l2
from pixelrec.runtime import set_quiet

NOISE = 1.5  # within-cluster spread vs unit-variance centres: clusters overlap, as real embeddings do


@dataclass
class Row:
    """One measured method at one catalogue size."""

    method: str
    qps: float
    recall: float | None = None
    build_s: float | None = None
    index_mb: float | None = None
    note: str = ""
    key: str = ""  # the method's name independent of N (spec template), for the growth table

    def __post_init__(self) -> None:
        self.key = self.key or self.method


def int_list(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int_list,
                        help="catalogue sizes, comma-separated (default 10k,100k,1M; 1M with --target-recall)")
    parser.add_argument("--dim", type=int_list, default=[64], help="vector dimensions, comma-separated")
    parser.add_argument("--users", type=int, default=10_000, help="query vectors per catalogue size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--history", type=int, default=20, help="excluded items per user")
    parser.add_argument("--specs", default="IVF{nlist},Flat;HNSW32",
                        help="approximate FAISS specs separated by ';' ({nlist} = round(4 sqrt(N))); Flat always runs")
    parser.add_argument("--nprobe", type=int_list, default=[8, 32, 128], help="nprobe values for IVF specs")
    parser.add_argument("--ef-search", type=int_list, default=[32, 128, 512], help="efSearch values for HNSW specs")
    parser.add_argument("--repeat", type=int, default=2, help="searches are timed as the best of this many runs")
    parser.add_argument("--bf-budget", type=float, default=5e8, help="users x items scored by brute force per size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (torch and FAISS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10k items, 2000 users, first dimension only")
    parser.add_argument("--target-recall", type=float, help="tuning mode: the recall@k target (0 < R <= 1)")
    parser.add_argument("--tune-sample", type=int, default=2000, help="tuning mode: users sampled (half held out)")
    parser.add_argument("--vectors", default="synthetic",
                        help="'synthetic' (clustered Gaussians) or 'fitted:RUN_DIR' (mixtures fitted to a trained run)")
    parser.add_argument("--tune-specs", default="auto",
                        help="tuning mode: 'auto' (the tuner's default candidates) or specs separated by ';' "
                             "(',RFlat' = refine step with k_factor 8)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.users, args.dim = [10_000], min(args.users, 2000), args.dim[:1]
    if args.items is None:
        args.items = [1_000_000] if args.target_recall is not None else [10_000, 100_000, 1_000_000]
    return args


def synthetic(n_items: int, dim: int, users: int, history: int, seed: int):
    """Clustered Gaussian item/user vectors and per-user histories drawn from the user's cluster."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(math.sqrt(n_items)))
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    item_cluster = rng.integers(0, n_clusters, n_items)
    items = centers[item_cluster] + NOISE * rng.standard_normal((n_items, dim)).astype(np.float32)
    user_cluster = rng.integers(0, n_clusters, users)
    queries = centers[user_cluster] + NOISE * rng.standard_normal((users, dim)).astype(np.float32)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    members = np.argsort(item_cluster, kind="stable")
    starts = np.searchsorted(item_cluster[members], np.arange(n_clusters + 1))
    histories = []
    for cluster in user_cluster:
        pool = members[starts[cluster]:starts[cluster + 1]]
        histories.append(ids[rng.choice(pool, size=min(history, len(pool)), replace=False)])
    return items.astype(np.float32), ids, queries.astype(np.float32), histories


def fitted(run_dir: str, n_items: int, dim: int, users: int, history: int, seed: int):
    """Item and user vectors sampled from Gaussian mixtures fitted to a trained run's item vectors
    and user vectors (each user's vector after their whole history); histories are random ids."""
    from sklearn.mixture import GaussianMixture

    from pixelrec.runs.trained import load_trained

    trained = load_trained(run_dir)
    items = np.asarray(trained.index.vectors, dtype=np.float32)
    if items.shape[1] != dim:
        raise SystemExit(f"{run_dir} has {items.shape[1]}-dimensional vectors; pass --dim {items.shape[1]}")
    histories = [trained.data.history(int(u), "all") for u in range(trained.data.num_users)]
    user_vectors = np.asarray(trained.model.encode_histories(histories, item_table=trained.table), dtype=np.float32)
    rng = np.random.default_rng(seed)
    sampled = []
    for data, components, size in ((items, 32, n_items), (user_vectors, 8, users)):
        mixture = GaussianMixture(min(components, len(data) // 20 or 1), covariance_type="full", reg_covar=1e-4,
                                  random_state=seed).fit(data)
        sampled.append(mixture.sample(size)[0].astype(np.float32)[rng.permutation(size)])
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    exclude = [rng.choice(ids, size=min(history, n_items - 1), replace=False) for _ in range(users)]
    return np.ascontiguousarray(sampled[0]), ids, np.ascontiguousarray(sampled[1]), exclude


def vectors_for(args: argparse.Namespace, n_items: int, dim: int, users: int):
    """(items, ids, queries, histories) of `--vectors`."""
    if args.vectors == "synthetic":
        return synthetic(n_items, dim, users, args.history, args.seed)
    if args.vectors.startswith("fitted:"):
        return fitted(args.vectors.removeprefix("fitted:"), n_items, dim, users, args.history, args.seed)
    raise SystemExit(f"--vectors must be 'synthetic' or 'fitted:RUN_DIR', got {args.vectors!r}")


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result, best wall time over `repeat` calls)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def torch_topk_search(items: np.ndarray, queries: np.ndarray, k: int, histories: list[np.ndarray], device: str,
                      batch: int) -> np.ndarray:
    """PixelRec-style evaluation loop: scores = users @ items.T, history set to -inf, torch.topk.

    Synthetic ids are positions + 1, so ids and columns convert by +-1.
    """
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    table = torch.from_numpy(items).to(dev)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        scores = torch.from_numpy(queries[start:start + batch]).to(dev) @ table.T
        chunk = histories[start:start + batch]
        rows = np.repeat(np.arange(len(chunk)), [len(h) for h in chunk])
        columns = torch.from_numpy(np.concatenate(chunk) - 1).to(dev)
        scores[torch.from_numpy(rows).to(dev), columns] = -torch.inf
        out[start:start + batch] = scores.topk(k, dim=1).indices.cpu().numpy() + 1
    return out


def recall_vs(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found (row by row)."""
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, exact)]))


def measure_size(n_items: int, dim: int, args: argparse.Namespace) -> tuple[list[Row], str]:
    """All methods at one catalogue size; returns the rows and the table header."""
    items, ids, queries, histories = vectors_for(args, n_items, dim, args.users)
    bf_users = int(min(args.users, max(100, args.bf_budget // n_items)))
    batch = max(1, (1 << 24) // n_items)

    flat, flat_build = timed(ItemIndex.build, items, ids, device=args.device)
    (_, exact), flat_s = timed(flat.search, queries, args.k, exclude=histories, repeat=args.repeat)
    _, plain_s = timed(flat.search, queries, args.k, repeat=args.repeat)

    (_, brute), brute_s = timed(brute_force_search, items, ids, queries[:bf_users], args.k,
                                exclude=histories[:bf_users], device=args.device)
    same_rows = float(np.mean((brute == exact[:bf_users]).all(axis=1)))
    topk, topk_s = timed(torch_topk_search, items, queries[:bf_users], args.k, histories[:bf_users], args.device, batch,
                         repeat=args.repeat)
    rows = [
        Row("torch full sort (reference)", bf_users / brute_s, recall_vs(brute, exact[:bf_users]),
            note=f"{bf_users} users; rows identical to Flat: {same_rows:.1%}"),
        Row("torch matmul+topk", bf_users / topk_s, recall_vs(topk, exact[:bf_users]), note=f"{bf_users} users"),
        Row("FAISS Flat", len(queries) / flat_s, 1.0, flat_build, flat.serialized_size() / 2**20),
        Row("FAISS Flat without exclusion", len(queries) / plain_s, note="plain top-k: cost of over-fetch + filter"),
    ]
    nlist = round(4 * math.sqrt(n_items))
    for template in filter(None, args.specs.split(";")):
        rows += measure_spec(template, template.format(nlist=nlist), items, ids, queries, histories, exact, args)
    header = (f"{args.vectors} vectors, N={n_items:,} items, d={dim}, {len(queries):,} users (brute force {bf_users:,}), "
              f"k={args.k}, {args.history} excluded items/user, device={flat.device}")
    return rows, header


def measure_spec(template: str, spec: str, items: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                 histories: list[np.ndarray], exact: np.ndarray, args: argparse.Namespace) -> list[Row]:
    """Build one approximate spec, then time and score it for each nprobe / efSearch value."""
    index, build_s = timed(ItemIndex.build, items, ids, spec=spec, device=args.device)
    size_mb = index.serialized_size() / 2**20
    if index.nprobe is not None:
        settings = [{"nprobe": n} for n in args.nprobe]
    elif index.ef_search is not None:
        settings = [{"ef_search": e} for e in args.ef_search]
    else:
        settings = [{}]
    rows = []
    for setting in settings:
        index.set_search_params(**setting)
        (_, found), search_s = timed(index.search, queries, args.k, exclude=histories, repeat=args.repeat)
        suffix = "".join(f" {name}={value}" for name, value in setting.items())
        rows.append(Row(spec + suffix, len(queries) / search_s, recall_vs(found, exact), build_s, size_mb,
                        key=template + suffix))
    return rows


def print_table(header: str, rows: list[Row]) -> None:
    flat_qps = next(row.qps for row in rows if row.method == "FAISS Flat")
    print(f"\n{header}")
    print(f"{'method':<34}{'queries/s':>11}{'x Flat':>8}{'recall@k':>10}{'build s':>9}{'index MB':>10}  note")
    for row in rows:
        print(f"{row.method:<34}{row.qps:>11,.0f}{row.qps / flat_qps:>8.3f}{fmt(row.recall, '.4f'):>10}"
              f"{fmt(row.build_s, '.2f'):>9}{fmt(row.index_mb, '.1f'):>10}  {row.note}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_growth(results: dict[tuple[int, int], list[Row]]) -> None:
    """Queries/s per method across N, and how per-query time grows relative to N."""
    for dim in sorted({d for d, _ in results}):
        sizes = sorted(n for d, n in results if d == dim)
        if len(sizes) < 2:
            continue
        print(f"\nGrowth with N (d={dim}): queries/s, and per-query time ratio between successive sizes")
        print(f"{'method':<34}" + "".join(f"{f'N={n:,}':>14}" for n in sizes) + "  time ratio per step (N ratio)")
        qps_by_key = [{row.key: row.qps for row in results[(dim, n)]} for n in sizes]
        for key in qps_by_key[0]:
            qps = [per_size.get(key, float("nan")) for per_size in qps_by_key]
            steps = ", ".join(f"{qps[i] / qps[i + 1]:.1f}x ({sizes[i + 1] / sizes[i]:.0f}x)"
                              for i in range(len(sizes) - 1))
            print(f"{key:<34}" + "".join(f"{q:>14,.0f}" for q in qps) + f"  {steps}")


def tune_candidates(text: str, n_items: int, dim: int) -> list[tuning.Candidate]:
    """The tuner's default candidates, or the specs of `--tune-specs`."""
    if text == "auto":
        return tuning.default_candidates(n_items, dim)
    specs = [spec.strip() for spec in text.split(";") if spec.strip()]
    return [tuning.hnsw_candidate(spec, n_items) if split_ip_to_l2(spec)[1].startswith("HNSW") else
            tuning.ivf_candidate(spec, tuning.REFINE_K_FACTOR if spec.endswith(",RFlat") else None)
            for spec in specs]


def measure_tuning(n_items: int, dim: int, args: argparse.Namespace) -> None:
    """Tuning mode at one size: the tuner on synthetic vectors, its choice and its frontier."""
    users = args.tune_sample  # the synthetic users are the sample
    items, ids, queries, histories = vectors_for(args, n_items, dim, users)
    tune_rows, heldout_rows = tuning.split_sample(users, users, args.seed)
    sample = tuning.Sample(queries, histories, tune_rows, heldout_rows)
    candidates = tune_candidates(args.tune_specs, n_items, dim)
    print(f"\n{args.vectors} vectors, N={n_items:,} items, d={dim}, k={args.k}, {len(tune_rows):,} tuning + {len(heldout_rows):,} held-out "
          f"queries, {args.history} excluded items/user, target recall@{args.k} >= {args.target_recall}; "
          f"candidates: {'; '.join(c.spec for c in candidates)}", flush=True)
    start = time.perf_counter()
    try:
        result = tuning.tune_index(items, ids, sample, args.target_recall, k=args.k, candidates=candidates,
                                   repeat=args.repeat, seed=args.seed)
    except tuning.TargetNotReached as error:
        print(f"target not reached: {error}")
        print(tuning.frontier_table(error.points))
        return
    finally:
        print(f"tuning took {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    chosen = result.chosen
    print(f"chosen: {chosen.label()}: recall {chosen.recall:.4f} held out ({chosen.tuning_recall:.4f} tuning), "
          f"{chosen.queries_per_s:,.0f} queries/s = {chosen.speedup:.2f}x Flat ({result.flat_queries_per_s:,.0f} q/s); "
          f"parameters {result.params}")
    print(tuning.frontier_table(result.points, chosen))


def main() -> None:
    args = parse_args()
    if args.target_recall is not None:
        set_quiet(False)  # the tuner's progress lines (bars stay off inside it)
        print(f"retrieval tuning benchmark: {os.cpu_count()} CPU cores, faiss {faiss.__version__} "
              f"({faiss.omp_get_max_threads()} threads), load average {os.getloadavg()[0]:.1f}")
        for dim in args.dim:
            for n_items in args.items:
                measure_tuning(n_items, dim, args)
        return
    set_quiet(True)
    torch.manual_seed(args.seed)
    print(f"retrieval benchmark: {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), device {args.device}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[int, int], list[Row]] = {}
    total = time.perf_counter()
    for dim in args.dim:
        for n_items in args.items:
            rows, header = measure_size(n_items, dim, args)
            print_table(header, rows)
            results[(dim, n_items)] = rows
    print_growth(results)
    print(f"\ntotal {time.perf_counter() - total:.0f} s. recall@k = fraction of the exact (Flat) top-k found; "
          f"'x Flat' = queries/s relative to FAISS Flat; spec labels use nlist = round(4 sqrt(N)).")


if __name__ == "__main__":
    main()
