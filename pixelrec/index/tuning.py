"""Pick an approximate index that meets a recall target on real queries (`pixelrec index --target-recall`).

The tuner works on vectors only: item vectors with their ids, and a sample of query vectors with
the ids each query must not get (a user's history), split into a tuning half and a held-out half.
For every candidate index it

1. builds the index, training any IVF quantizer and PQ codebooks on a seeded sample of the items
   (TRAIN_POINTS_PER_LIST vectors per list, at most MAX_TRAIN_POINTS) rather than on all of them,
   so a 1M-item build stays near a minute on two cores;
2. sweeps the search breadth (nprobe for IVF, efSearch for HNSW) upwards, galloping through a
   geometric grid and then bisecting, to find the smallest breadth at which recall@k reaches the
   target on BOTH halves; recall@k is the share of the exact top-k (FAISS Flat through
   `ItemIndex.search`, history excluded as retrieval does) that the candidate returns. A candidate
   with an exact re-ranking step sweeps once per k_factor (8, 4, 2: how many candidates per result
   are re-ranked);
3. times each measured setting on the whole sample against Flat (best of `repeat` searches each).

Exact search (Flat, recall 1 by definition, timed the same way) is a candidate too: the fastest
setting that reaches the target is chosen, and that is Flat whenever no approximate index reaching
it is faster (a small catalogue, or a target too high for the candidates). Every measured setting,
Flat's included, is kept as the frontier (recall against speed-up). Without Flat
(`include_flat=False`, for benchmarks of the approximate indexes alone), a target none reaches is a
`TargetNotReached` naming the best one found. The search parameters FAISS serialises with the index (nprobe, efSearch, the HNSW
quantizer's efSearch, the refine step's k_factor) travel with the chosen `ItemIndex`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from ..errors import PixelrecError
from ..runtime import is_quiet, log, set_quiet
from .faiss_factory import IP_TO_L2, faiss_rows, new_faiss_index, split_ip_to_l2
from .faiss_index import ItemIndex

TUNING_FILE = "tuning.json"  # sidecar in an index directory: what the tuner measured and chose
TRAIN_POINTS_PER_LIST = 32  # IVF training sample per list (FAISS advises 39; 32 loses no recall here)...
MAX_TRAIN_POINTS = 131_072  # ...up to this many in all, which keeps a 1M-item build near a minute
REFINE_K_FACTOR = 8  # refine candidates re-rank k_factor x the fetched candidates exactly
HNSW_MAX_ITEMS = 250_000  # plain HNSW's build grows past a minute beyond this on two cores
GRID_RATIO = 1.25  # successive breadths of a sweep differ by this factor
NPROBE_SHARE = 2  # nprobe stops at nlist / NPROBE_SHARE (beyond that, scan everything: Flat)
MAX_EF_SEARCH = 2048
EXACT = "exact"  # the knob of the Flat point: no breadth to set
NO_PARAMS = {"nprobe": None, "ef_search": None, "quantizer_ef_search": None, "k_factor": None}


class TargetNotReached(PixelrecError):
    """No candidate reached the target; `points` is everything measured (the frontier)."""

    def __init__(self, message: str, points: list["Point"]):
        super().__init__(message)
        self.points = points


@dataclass(frozen=True)
class Candidate:
    """One index to try: a FAISS factory spec and the breadth knob swept over `values`."""

    spec: str
    knob: str  # "nprobe" (IVF) or "efSearch" (HNSW)
    values: tuple[int, ...]  # ascending
    k_factor: int | None = None  # the refine step's k_factor (specs ending in ",RFlat")


@dataclass
class Point:
    """One measured setting of one candidate."""

    spec: str
    knob: str
    value: int
    k_factor: int | None
    recall: float  # recall@k on the held-out half
    tuning_recall: float  # recall@k on the tuning half
    seconds: float  # best search time of the whole sample
    queries_per_s: float
    speedup: float = math.nan  # queries/s against Flat's, filled in once Flat's best time is known
    build_seconds: float = math.nan

    def label(self) -> str:
        if self.knob == EXACT:
            return f"{self.spec} (exact search)"
        refine = f", k_factor={self.k_factor}" if self.k_factor else ""
        return f"{self.spec} {self.knob}={self.value}{refine}"

    def reaches(self, target: float) -> bool:
        return self.recall >= target and self.tuning_recall >= target


@dataclass
class Sample:
    """Query vectors [U, d], each with the ids it must not get, split into tuning and held-out rows."""

    queries: np.ndarray
    exclude: list[np.ndarray]
    tuning: np.ndarray  # row indices
    heldout: np.ndarray  # row indices

    def __post_init__(self) -> None:
        if len(self.tuning) == 0 or len(self.heldout) == 0:
            raise PixelrecError("tuning needs at least one tuning and one held-out query")


@dataclass
class Tuning:
    """The chosen index, its setting and everything measured on the way."""

    index: ItemIndex
    chosen: Point
    points: list[Point]
    flat_queries_per_s: float
    target: float
    k: int
    sample: Sample
    params: dict[str, int | None] = field(default_factory=dict)  # every search parameter of the choice
    why_flat: str = ""  # when exact search was kept: why no approximate index was chosen

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON-ready tuning record (TUNING_FILE); `extra` adds fields (e.g. the held-out user ids)."""
        return {
            "target_recall": self.target, "k": self.k, "metric": self.index.metric,
            "spec": self.chosen.spec, "params": self.params,
            "recall": round(self.chosen.recall, 6), "tuning_recall": round(self.chosen.tuning_recall, 6),
            "speedup": round(self.chosen.speedup, 3), "queries_per_s": round(self.chosen.queries_per_s, 1),
            "flat_queries_per_s": round(self.flat_queries_per_s, 1),
            "build_seconds": round(self.chosen.build_seconds, 2),
            "items": self.index.ntotal, "dim": self.index.dim,
            "sample": {"tuning": len(self.sample.tuning), "heldout": len(self.sample.heldout)},
            "faiss_threads": faiss.omp_get_max_threads(), "load_average": round(os.getloadavg()[0], 2),
            "frontier": [_point_record(p) for p in self.points],
            **({"why_flat": self.why_flat} if self.why_flat else {}),
            **extra,
        }


# --------------------------------------------------------------------------------- candidates
def default_candidates(num_items: int, dim: int, metric: str = "ip") -> list[Candidate]:
    """The indexes tried for a catalogue of `num_items` `dim`-dimensional vectors.

    With L = about 4 sqrt(N) lists (a power of two with at least TRAIN_POINTS_PER_LIST items each):
    IVF with an HNSW coarse quantizer and L lists; the same with L/2 lists and fast-scan PQ codes plus
    exact re-ranking (",RFlat"); for inner products, PQ + re-ranking with L and L/2 lists after the
    inner-product-to-L2 reduction ("IP2L2,", see `faiss_index`), whose lists follow the norms as well
    as the directions, with a flat coarse quantizer (faster than HNSW's below ~10K lists: the
    queries' centroid distances are one matrix product); plain HNSW32 up to HNSW_MAX_ITEMS items.
    At 1M items, d 64, inner product: IVF4096_HNSW32 (Flat), IVF2048_HNSW32 (PQ64 + refine), IP2L2
    IVF4096 and IVF2048 (PQ65 + refine).
    """
    lists = 2 ** round(math.log2(4 * math.sqrt(num_items)))
    while lists > 1 and lists * TRAIN_POINTS_PER_LIST > num_items:
        lists //= 2
    candidates = []
    if lists >= 2:
        candidates.append(ivf_candidate(f"IVF{lists}_HNSW32,Flat"))
        half = max(2, lists // 2)
        candidates.append(ivf_candidate(f"IVF{half}_HNSW32,PQ{_pq_subquantizers(dim)}x4fs,RFlat",
                                        k_factor=REFINE_K_FACTOR))
        if metric == "ip":
            pq = f"PQ{_pq_subquantizers(dim + 1)}x4fs"
            for n in sorted({lists, half}, reverse=True):
                candidates.append(ivf_candidate(f"{IP_TO_L2},IVF{n},{pq},RFlat", k_factor=REFINE_K_FACTOR))
    if num_items <= HNSW_MAX_ITEMS:
        candidates.append(hnsw_candidate("HNSW32", num_items))
    return candidates


def ivf_candidate(spec: str, k_factor: int | None = None) -> Candidate:
    """An IVF spec ("[IP2L2,]IVF<n>...") swept over nprobe 1 .. n / NPROBE_SHARE."""
    nlist = int(split_ip_to_l2(spec)[1].split(",")[0].split("_")[0].removeprefix("IVF"))
    return Candidate(spec, "nprobe", breadth_grid(1, max(1, nlist // NPROBE_SHARE)), k_factor)


def hnsw_candidate(spec: str, num_items: int) -> Candidate:
    """An HNSW spec swept over efSearch 16 .. min(MAX_EF_SEARCH, number of items)."""
    return Candidate(spec, "efSearch", breadth_grid(16, max(16, min(MAX_EF_SEARCH, num_items))))


def breadth_grid(low: int, high: int) -> tuple[int, ...]:
    """Integers from `low` to `high` (both included), each about GRID_RATIO times the previous."""
    values, value = [], low
    while value < high:
        values.append(value)
        value = max(value + 1, int(round(value * GRID_RATIO)))
    return tuple(values + [high])


def _pq_subquantizers(dim: int) -> int:
    """PQ sub-quantizers: one per dimension up to 128, else one per 2, 4 or 8 dimensions."""
    for step in (1, 2, 4, 8):
        if dim % step == 0 and dim // step <= 128:
            return dim // step
    return dim


# --------------------------------------------------------------------------------- building
@dataclass
class Built:
    """A candidate's index, the raw FAISS index inside it (for parameters ItemIndex does not track)."""

    index: ItemIndex
    raw: faiss.Index
    seconds: float


def build_candidate(vectors: np.ndarray, ids: np.ndarray, candidate: Candidate, metric: str = "ip",
                    seed: int = 0) -> Built:
    """The candidate's index over `vectors` under `ids`, trained on a seeded sample of the vectors."""
    start = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index, spec = new_faiss_index(candidate.spec, vectors.shape[1])
    data, radius = faiss_rows(vectors, metric, spec)
    try:
        _train_on_sample(index, data, seed)
        raw = faiss.IndexIDMap(index)
        raw.add_with_ids(data, ids)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise PixelrecError(f"index {candidate.spec!r} cannot be built here: {first}") from None
    built = Built(ItemIndex(raw, vectors, ids, spec=spec, metric=metric, radius=radius), raw,
                  time.perf_counter() - start)
    set_k_factor(built, candidate.k_factor)
    return built


def _train_on_sample(index: faiss.Index, data: np.ndarray, seed: int) -> None:
    """Train `index` on TRAIN_POINTS_PER_LIST vectors per IVF list, at most MAX_TRAIN_POINTS (all
    vectors when there are fewer)."""
    if index.is_trained:
        return
    ivf = faiss.try_extract_index_ivf(index)
    wanted = len(data) if ivf is None else max(min(TRAIN_POINTS_PER_LIST * int(ivf.nlist), MAX_TRAIN_POINTS),
                                               int(ivf.nlist))
    if ivf is not None:  # the sample is sized on purpose: keep FAISS's too-few-points warnings quiet
        ivf.cp.min_points_per_centroid = 1
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.min_points_per_centroid = 1
    if wanted < len(data):
        rows = np.sort(np.random.default_rng(seed).choice(len(data), wanted, replace=False))
        data = data[rows]
    index.train(data)


def apply_breadth(built: Built, candidate: Candidate, value: int) -> dict[str, int | None]:
    """Set the candidate's breadth knob to `value`; returns every search parameter now in effect.

    An IVF index with an HNSW quantizer gets quantizer efSearch = nprobe: FAISS's default (16)
    returns poor lists once nprobe exceeds it.
    """
    if candidate.knob == "nprobe":
        built.index.set_search_params(nprobe=value)
        quantizer = _hnsw_quantizer(built.raw)
        if quantizer is not None:
            faiss.ParameterSpace().set_index_parameter(built.raw, "quantizer_efSearch", max(16, value))
    else:
        built.index.set_search_params(ef_search=value)
    return search_params(built.raw)


def search_params(raw: faiss.Index) -> dict[str, int | None]:
    """nprobe, efSearch, the HNSW quantizer's efSearch and the refine k_factor of an index (None: n/a)."""
    ivf = faiss.try_extract_index_ivf(raw)
    quantizer = _hnsw_quantizer(raw)
    hnsw = _plain_hnsw(raw)
    refine = _refine(raw)
    return {"nprobe": int(ivf.nprobe) if ivf is not None else None,
            "ef_search": int(hnsw.hnsw.efSearch) if hnsw is not None else None,
            "quantizer_ef_search": int(quantizer.hnsw.efSearch) if quantizer is not None else None,
            "k_factor": int(refine.k_factor) if refine is not None else None}


def _unwrap(raw: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(raw)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def _refine(raw: faiss.Index) -> Any:
    index = _unwrap(raw)
    return index if isinstance(index, faiss.IndexRefine) else None


def _plain_hnsw(raw: faiss.Index) -> Any:
    index = _unwrap(raw)
    refine = _refine(raw)
    if refine is not None:
        index = faiss.downcast_index(refine.base_index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def _hnsw_quantizer(raw: faiss.Index) -> Any:
    ivf = faiss.try_extract_index_ivf(raw)
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


# --------------------------------------------------------------------------------- measuring
def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of the share of the exact ids (ignoring -1 padding) that `found` contains."""
    shares = []
    for got, want in zip(found, exact):
        want = want[want >= 0]
        if len(want):
            shares.append(len(np.intersect1d(got[got >= 0], want)) / len(want))
    return float(np.mean(shares)) if shares else 1.0


class _Bench:
    """Searches the sample with any index: recall of both halves against Flat, best time of `repeat`."""

    def __init__(self, flat: ItemIndex, sample: Sample, k: int, repeat: int, flat_build_seconds: float = 0.0):
        self.sample, self.k, self.repeat = sample, k, max(1, repeat)
        self.flat_build_seconds = flat_build_seconds
        seconds, self.exact = self._search(flat)
        self.flat_seconds = [seconds]
        self.flat = flat

    def _search(self, index: ItemIndex) -> tuple[float, np.ndarray]:
        """(seconds, ids found) of one search of the whole sample, without a progress bar."""
        quiet = is_quiet()
        set_quiet(True)
        try:
            start = time.perf_counter()
            _, found = index.search(self.sample.queries, self.k, exclude=self.sample.exclude)
            return time.perf_counter() - start, found
        finally:
            set_quiet(quiet)

    def time_flat(self) -> None:
        self.flat_seconds.append(self._search(self.flat)[0])

    def flat_point(self) -> Point:
        """Flat as a measured setting: recall 1 (it is the reference), its best search time."""
        seconds = min(self.flat_seconds)
        return Point("Flat", EXACT, 0, None, 1.0, 1.0, seconds, len(self.sample.queries) / seconds,
                     build_seconds=self.flat_build_seconds)

    def measure(self, built: Built, candidate: Candidate, value: int) -> Point:
        """Recall and speed at breadth `value` (and the refine k_factor the index has now)."""
        apply_breadth(built, candidate, value)
        seconds, found = self._search(built.index)
        s = self.sample
        point = Point(candidate.spec, candidate.knob, value, search_params(built.raw)["k_factor"],
                      recall_at_k(found[s.heldout], self.exact[s.heldout]),
                      recall_at_k(found[s.tuning], self.exact[s.tuning]), seconds, 0.0,
                      build_seconds=built.seconds)
        for _ in range(self.repeat - 1):
            point.seconds = min(point.seconds, self._search(built.index)[0])
        point.queries_per_s = len(s.queries) / point.seconds
        return point


# --------------------------------------------------------------------------------- the sweep
def sweep(measure: Callable[[int], Point], values: Sequence[int], target: float) -> list[Point]:
    """Measured points up to the smallest value reaching `target` (recall grows with breadth):
    gallop through `values` (every third, about 2x) until one reaches it, then bisect below it."""
    points: dict[int, Point] = {}

    def at(position: int) -> Point:
        if position not in points:
            points[position] = measure(values[position])
        return points[position]

    low, position = -1, 0
    while not at(position).reaches(target):
        if position == len(values) - 1:
            return [points[p] for p in sorted(points)]
        low, position = position, min(position + 3, len(values) - 1)
    high = position
    while high - low > 1:
        middle = (low + high) // 2
        if at(middle).reaches(target):
            high = middle
        else:
            low = middle
    return [points[p] for p in sorted(points)]


def tune_index(vectors: np.ndarray, ids: np.ndarray, sample: Sample, target: float, k: int = 10,
               metric: str = "ip", candidates: Sequence[Candidate] | None = None, repeat: int = 2,
               seed: int = 0, include_flat: bool = True) -> Tuning:
    """Try every candidate (default: `default_candidates`) and return the fastest one that reaches
    recall@k >= `target` on both halves of `sample`. Flat (exact search) is one of them unless
    `include_flat` is False, and it is kept when no approximate index reaching the target is faster;
    without it, a target none reaches is a TargetNotReached naming the best one."""
    check_target(target)
    start = time.perf_counter()
    flat = ItemIndex.build(vectors, ids, spec="Flat", metric=metric)
    vectors, ids = np.asarray(flat.vectors), np.asarray(flat.ids)  # validated, float32 / int64
    if int(k) != k or k < 1 or k > len(ids):
        raise PixelrecError(f"--k must be between 1 and the {len(ids)} indexed items, got {k}")
    bench = _Bench(flat, sample, int(k), repeat, time.perf_counter() - start)
    if candidates is None:
        candidates = default_candidates(len(ids), vectors.shape[1], metric)
    candidates = list(candidates)
    points: list[Point] = []
    best: tuple[Point, Built, dict] | None = None
    for number, candidate in enumerate(candidates, 1):
        built = build_candidate(vectors, ids, candidate, metric, seed)
        tried = _sweep_k_factors(built, candidate, bench, target)
        points += tried
        fastest = max((p for p in tried if p.reaches(target)), key=lambda p: p.queries_per_s, default=None)
        log(f"tuning {number}/{len(candidates)}: {candidate.spec} built in {built.seconds:.1f}s; "
            + (f"{fastest.label()} reaches recall {fastest.recall:.4f}" if fastest else
               f"best recall {max(p.recall for p in tried):.4f} at {tried[-1].label()}"))
        if fastest and (best is None or fastest.queries_per_s > best[0].queries_per_s):
            set_k_factor(built, fastest.k_factor)
            best = (fastest, built, apply_breadth(built, candidate, fastest.value))
        del built
    for _ in range(max(1, repeat) - 1):  # Flat gets as many timed searches as each candidate setting
        bench.time_flat()
    flat_point = bench.flat_point()
    for point in points + [flat_point]:
        point.speedup = point.queries_per_s / flat_point.queries_per_s
    if include_flat:
        points.insert(0, flat_point)
        if best is None or best[0].queries_per_s <= flat_point.queries_per_s:
            why = _why_flat(best[0] if best else None, target, k)
            return Tuning(flat, flat_point, points, flat_point.queries_per_s, target, int(k), sample,
                          dict(NO_PARAMS), why)
    if best is None:
        if points:
            log(frontier_table(points))
        raise TargetNotReached(_unreached_message(points, target, k), points)
    return Tuning(best[1].index, best[0], points, flat_point.queries_per_s, target, int(k), sample, best[2])


def _why_flat(fastest: Point | None, target: float, k: int) -> str:
    """Why Flat was kept: no approximate index reached the target, or none that did was faster."""
    if fastest is None:
        return f"no approximate index tried reaches recall@{k} >= {target:g}"
    return (f"the fastest approximate index reaching recall@{k} >= {target:g}, {fastest.label()}, runs at "
            f"{fastest.speedup:.2f}x Flat's queries/s")


def _sweep_k_factors(built: Built, candidate: Candidate, bench: _Bench, target: float) -> list[Point]:
    """The breadth sweep, for a refine candidate once per k_factor of `refine_k_factors`, largest
    first: a smaller k_factor re-ranks fewer candidates (each a random read of a full vector, which
    dominates once a history's over-fetch multiplies them) but needs at least the breadth the larger
    one needed, so its sweep starts there and is skipped when the larger one never reached the target."""
    points: list[Point] = []
    values = candidate.values
    for k_factor in refine_k_factors(candidate.k_factor):
        set_k_factor(built, k_factor)
        tried = sweep(lambda value: bench.measure(built, candidate, value), values, target)
        points += tried
        reached = [p.value for p in tried if p.reaches(target)]
        if not reached:
            break
        values = tuple(v for v in values if v >= min(reached))
    set_k_factor(built, candidate.k_factor)
    return points


def refine_k_factors(largest: int | None) -> tuple[int | None, ...]:
    """k_factors tried for a refine candidate built with `largest`: it, a half and a quarter of it."""
    if not largest:
        return (largest,)
    return tuple(sorted({largest, max(1, largest // 2), max(1, largest // 4)}, reverse=True))


def set_k_factor(built: Built, k_factor: int | None) -> None:
    """Set the refine step's k_factor (nothing for indexes without one)."""
    if k_factor:
        faiss.ParameterSpace().set_index_parameter(built.raw, "k_factor_rf", int(k_factor))


def check_target(target: float) -> None:
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise PixelrecError(f"--target-recall must be in (0, 1], got {target}")


def _unreached_message(points: list[Point], target: float, k: int) -> str:
    if not points:
        return "no index to try for this catalogue (too few items for an approximate index); use --spec Flat"
    best = max(points, key=lambda p: (min(p.recall, p.tuning_recall), p.queries_per_s))
    return (f"no index tried reaches recall@{k} >= {target:g} on the sampled queries; the best was {best.label()} "
            f"with recall {min(best.recall, best.tuning_recall):.4f} at {best.speedup:.2f}x Flat's queries/s; "
            f"nothing was published (lower --target-recall, or keep exact search with --spec Flat)")


def _point_record(point: Point) -> dict[str, Any]:
    record = asdict(point)
    for name in ("recall", "tuning_recall"):
        record[name] = round(record[name], 6)
    for name, digits in (("seconds", 4), ("queries_per_s", 1), ("speedup", 3), ("build_seconds", 2)):
        record[name] = round(record[name], digits)
    return record


def frontier_table(points: Sequence[Point], chosen: Point | None = None) -> str:
    """The measured settings as a text table: recall (held-out, tuning), queries/s, speed-up, build time."""
    lines = [f"{'index and breadth':<52}{'recall':>8}{'tuning':>8}{'queries/s':>11}{'x Flat':>8}{'build s':>9}"]
    for p in points:
        mark = "  <- chosen" if p is chosen else ""
        lines.append(f"{p.label():<52}{p.recall:>8.4f}{p.tuning_recall:>8.4f}{p.queries_per_s:>11,.0f}"
                     f"{p.speedup:>8.2f}{p.build_seconds:>9.1f}{mark}")
    return "\n".join(lines)


def split_sample(count: int, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of min(sample, count) of `count` rows, split into tuning and held-out halves
    (sorted row numbers; the held-out half gets the extra one of an odd sample)."""
    if int(sample) != sample or sample < 2:
        raise PixelrecError(f"--sample must be at least 2 (a tuning and a held-out query), got {sample}")
    if count < 2:
        raise PixelrecError(f"tuning needs at least 2 users to sample, the run has {count}")
    rows = np.random.default_rng(seed).choice(count, min(int(sample), count), replace=False)
    half = len(rows) // 2
    return np.sort(rows[:half]), np.sort(rows[half:])
