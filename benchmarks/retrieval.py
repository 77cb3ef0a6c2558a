"""Retrieval benchmark: FAISS indexes vs torch brute-force full ranking.

For each catalogue size N (and dimension d) it builds synthetic clustered item and user vectors,
gives every user a history of items from their own cluster (excluded from the results, as in
evaluation), and measures queries/s, build time, serialized index size and recall@k against the
exact Flat top-k for:

- torch brute force, full stable sort (`brute_force_search`, the exact reference);
- torch brute force with topk instead of a full sort (what PixelRec-style evaluation loops do);
- FAISS Flat through `ItemIndex.search_with_faiss`, the exact `ItemIndex.search` (torch), and each
  approximate spec of `--specs`.

Brute force is timed on a subset of users when N is large (`--bf-budget` = users x items scored);
queries/s are per-query rates, so they compare directly. Example:

    python benchmarks/retrieval.py --items 10000,100000 --dim 64 --users 10000 --k 10

`--target-recall R` runs the tuner of `pixelrec index --target-recall` (`pixelrec.index.tuning`)
instead: on each size it samples `--tune-sample` users (half tuning, half held out), tries the
default candidates (or `--tune-specs`) and prints the chosen index, or the best one found, and the
whole frontier (recall vs speed-up over Flat of every measured setting). Default size 1M:

    python benchmarks/retrieval.py --target-recall 0.95 --k 10
    python benchmarks/retrieval.py --target-recall 0.95 --tune-specs HNSW32   # plain HNSW at 1M too

`--exact` compares exact (Flat) search paths batch by batch instead: queries/s at each catalogue
size for batches of `--batches` queries (default 1, 8, 64, 512, 4096), with `--history` excluded
items per query, of FAISS's Flat search as `ItemIndex` ran it before (`search_with_faiss`), of
today's `ItemIndex.search` (`pixelrec/index/exact.py`: fast candidates, canonical scores) and of a plain
`torch.mm` + `torch.topk` of the same shapes without exclusions (the matrix-product limit); each
batch's ids and scores are also compared, bit for bit, with one search of the first 64 queries.
`--evaluate-scale 0.1,1` adds evaluation at the Pixel200K shape (users and items of
benchmarks/pixel200k.py at that scale, the users' histories excluded, batches of 1,024, k 20) on
at most `--evaluate-users` users, with the time for all users extrapolated:

    OMP_NUM_THREADS=1 python benchmarks/retrieval.py --exact --evaluate-scale 0.1,1

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
from pixelrec.index.faiss_factory import split_ip_to_l2
from pixelrec.index.faiss_index import ItemIndex, brute_force_search
from pixelrec.runtime import set_quiet

SAME_ROWS = 64  # exact mode: rows compared, bit for bit, between a batch size and one search of them
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


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


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
    parser.add_argument("--exact", action="store_true", help="exact-search mode: batch sizes, before / now / limit")
    parser.add_argument("--batches", type=int_list, default=[1, 8, 64, 512, 4096],
                        help="exact mode: queries per search call, comma-separated")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="exact mode: seconds each method searches per measurement (at least one batch)")
    parser.add_argument("--evaluate-scale", type=float_list, default=[],
                        help="exact mode: Pixel200K scales to evaluate at (e.g. 0.1,1)")
    parser.add_argument("--evaluate-users", type=int, default=20_000,
                        help="exact mode: users searched per evaluate scale (time extrapolated to all)")
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
    (_, exact), flat_s = timed(flat.search_with_faiss, queries, args.k, exclude=histories, repeat=args.repeat)
    _, plain_s = timed(flat.search_with_faiss, queries, args.k, repeat=args.repeat)
    (_, now), now_s = timed(flat.search, queries, args.k, exclude=histories, repeat=args.repeat)

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
        Row("ItemIndex.search (Flat, torch)", len(queries) / now_s, recall_vs(now, exact),
            note="the exact path ItemIndex.search takes (pixelrec/index/exact.py)"),
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


# --------------------------------------------------------------------------------- exact mode
def matmul_limit(table: torch.Tensor, queries: np.ndarray, k: int, entries: int = 1 << 24) -> None:
    """A plain torch.mm of the queries with the items [d, N], then torch.topk, in item chunks of
    at most `entries` scores (no exclusions, no merge across chunks): what a matrix product costs."""
    query = torch.from_numpy(queries).to(table.device)
    chunk = max(k, entries // len(queries))
    for start in range(0, table.shape[1], chunk):
        top = torch.topk(torch.mm(query, table[:, start:start + chunk]), min(k, table.shape[1] - start), dim=1)
    top.indices.cpu()  # waits for a GPU


def rate(search, queries: np.ndarray, histories: list, batch: int, min_time: float) -> float:
    """Queries/s of `search(queries, histories)` called on consecutive batches until `min_time` passed."""
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < min_time:
        first = done % (len(queries) - batch + 1) if len(queries) > batch else 0
        search(queries[first:first + batch], histories[first:first + batch])
        done += batch
    return done / (time.perf_counter() - start)


def exact_methods(index: ItemIndex, items: np.ndarray, k: int) -> dict:
    """name -> search(queries, histories) of the three exact paths compared (the limit on the
    index's device)."""
    device = "cpu" if index.device.startswith("cpu") else index.device
    table = torch.from_numpy(np.ascontiguousarray(items.T)).to(device)
    return {"FAISS Flat (before)": lambda q, h: index.search_with_faiss(q, k, exclude=h),
            "ItemIndex.search (now)": lambda q, h: index.search(q, k, exclude=h),
            "torch.mm + topk (limit)": lambda q, h: matmul_limit(table, q, k)}


def measure_exact(n_items: int, dim: int, args: argparse.Namespace) -> None:
    """Exact mode at one catalogue size: queries/s per batch size of every method, interleaved."""
    pool = max(max(args.batches), SAME_ROWS)
    items, ids, queries, histories = synthetic(n_items, dim, pool, args.history, args.seed)
    index = ItemIndex.build(items, ids)
    methods = exact_methods(index, items, args.k)
    reference = {name: methods[name](queries[:SAME_ROWS], histories[:SAME_ROWS]) for name in list(methods)[:2]}
    print(f"\nN={n_items:,} items, d={dim}, k={args.k}, {args.history} excluded items/query, {index.describe()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'batch':>6}" + "".join(f"{name:>26}" for name in methods) + f"{'now / before':>14}{'now / limit':>13}"
          f"  first {SAME_ROWS} rows identical to one search of them (before / now)")
    for batch in args.batches:
        best = {name: 0.0 for name in methods}
        for _ in range(args.repeat):
            for name, search in methods.items():
                best[name] = max(best[name], rate(search, queries, histories, batch, args.min_time))
        same = []
        for name in list(methods)[:2]:
            parts = [methods[name](queries[s:s + batch], histories[s:s + batch])
                     for s in range(0, max(batch, SAME_ROWS), batch)]
            scores = np.concatenate([p[0] for p in parts])[:SAME_ROWS]
            found = np.concatenate([p[1] for p in parts])[:SAME_ROWS]
            same.append(np.array_equal(found, reference[name][1])
                        and scores.tobytes() == reference[name][0].tobytes())
        before, now, limit = best.values()
        print(f"{batch:>6}" + "".join(f"{q:>26,.0f}" for q in best.values()) + f"{now / before:>13.1f}x"
              f"{now / limit:>12.2f}x  {'yes' if same[0] else 'NO'} / {'yes' if same[1] else 'NO'}", flush=True)


def measure_evaluate_shape(scale: float, args: argparse.Namespace) -> None:
    """Exact mode: evaluation's searches at the Pixel200K shape (batches of 1,024 users, k 20)."""
    from pixel200k import ITEMS, USERS, sequence_lengths

    rng = np.random.default_rng(args.seed)
    n_items, n_users = round(ITEMS * scale), round(USERS * scale)
    users = min(n_users, args.evaluate_users)
    lengths = sequence_lengths(scale, rng)[rng.permutation(n_users)[:users]]
    items, ids, queries, _ = synthetic(n_items, 64, users, 0, args.seed)
    # each user's history: all but the held-out target, random ids
    histories = [rng.choice(ids, size=min(int(n) - 1, n_items), replace=False) for n in lengths]
    index = ItemIndex.build(items, ids)
    methods = exact_methods(index, items, 20)
    times = {name: math.inf for name in methods}
    for _ in range(args.repeat):
        for name, search in methods.items():
            start = time.perf_counter()
            for first in range(0, users, 1024):
                search(queries[first:first + 1024], histories[first:first + 1024])
            times[name] = min(times[name], time.perf_counter() - start)
    limit = times["torch.mm + topk (limit)"]
    print(f"\nevaluate at the Pixel200K shape, scale {scale}: {n_users:,} users ({users:,} timed), {n_items:,} items, "
          f"d 64, {np.mean(lengths) - 1:.1f} excluded items/user, batches of 1,024, k 20; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, seconds in times.items():
        print(f"  {name:<26} {seconds:8.1f} s for {users:,} users = {seconds * n_users / users:8.1f} s for all "
              f"{n_users:,} ({seconds / limit:.2f}x the limit)", flush=True)


def main_exact(args: argparse.Namespace) -> None:
    set_quiet(True)
    print(f"exact search benchmark: {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads); "
          f"queries/s, best of {args.repeat} interleaved runs of >= {args.min_time} s", flush=True)
    for dim in args.dim if args.batches else []:  # --batches '': the evaluate shapes only
        for n_items in args.items:
            measure_exact(n_items, dim, args)
    for scale in args.evaluate_scale:
        measure_evaluate_shape(scale, args)


def main() -> None:
    args = parse_args()
    if args.exact:
        main_exact(args)
        return
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
