"""Making a FAISS index for item vectors: a factory spec turned into an (untrained) index, the rows it
stores, its training, its search parameters and its placement on GPUs.

`ItemIndex` (faiss_index.py) is built from these; `index.tuning` uses them to try candidate specs.
A spec may start with "IP2L2," (see faiss_index.py's module docstring): the index is then an L2
index over one extra coordinate per item (`faiss_rows`), and its answers are inner products.
"""

from __future__ import annotations

import re
from typing import Any

import faiss
import numpy as np
import torch

from ..errors import PixelrecError
from ..runtime import log, resolve_device

EXAMPLE_SPECS = ("Flat", "IVF1024,Flat", "IVF1024,PQ16", "HNSW32", "OPQ16,IVF1024,PQ16", "PQ16", "SQ8")
GPU_LAYOUTS = ("shard", "replicate")  # how an index spreads over several GPUs
IP_TO_L2 = "IP2L2"  # spec prefix: inner products searched as L2 distances over one extra coordinate


# --------------------------------------------------------------------------------- rows
def for_metric(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as FAISS sees them: unchanged for "ip", L2-normalised rows for "cosine"."""
    if metric == "ip":
        return vectors
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


# --------------------------------------------------------------------------------- index creation
def new_faiss_index(spec: str, dim: int) -> tuple[faiss.Index, str]:
    """An untrained FAISS index for `spec` over `dim`-dimensional item vectors, and the spec as
    stored (a bare "IVF<n>" becomes "IVF<n>,Flat"): inner product, or for an "IP2L2," spec an L2
    index over dim + 1 coordinates (fill it with `faiss_rows`)."""
    if re.fullmatch(r"(.+,)?IVF\d+(_\w+)?", spec):
        spec += ",Flat"
    reduced, body = split_ip_to_l2(spec)
    if reduced and not body:
        raise PixelrecError(f"index spec {spec!r}: {IP_TO_L2}, must be followed by a FAISS spec, "
                            f"e.g. '{IP_TO_L2},IVF1024,Flat'")
    try:
        if reduced:
            return faiss.index_factory(dim + 1, body, faiss.METRIC_L2), spec
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT), spec
    except RuntimeError as error:
        examples = "; ".join(EXAMPLE_SPECS)
        raise PixelrecError(
            f"invalid index spec {spec!r} for {dim}-dimensional vectors: {faiss_message(error)}; "
            f"valid examples: {examples} (any FAISS index_factory string with inner-product support)"
        ) from None


def split_ip_to_l2(spec: str) -> tuple[bool, str]:
    """(whether `spec` asks for the inner-product-to-L2 reduction, the FAISS spec after the prefix)."""
    head, _, rest = spec.partition(",")
    return (True, rest) if head == IP_TO_L2 else (False, spec)


def faiss_rows(vectors: np.ndarray, metric: str, spec: str,
               radius: float | None = None) -> tuple[np.ndarray, float | None]:
    """(rows as the FAISS index of `spec` stores them, R): `vectors` for the metric (L2-normalised for
    cosine), plus for an "IP2L2," spec the coordinate sqrt(R^2 - |x|^2), R the largest norm unless
    given (items added to an existing index must not be longer: `ItemIndex.add` checks)."""
    data = for_metric(vectors, metric)
    if not split_ip_to_l2(spec)[0]:
        return data, None
    norms2 = squared_norms(data)
    if radius is None:
        radius = float(np.sqrt(norms2.max())) if len(norms2) else 0.0
    return with_extra_coordinate(data, np.sqrt(np.maximum(radius * radius - norms2, 0.0))), radius


def squared_norms(rows: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)


def with_extra_coordinate(rows: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """[N, d] rows and [N] values -> [N, d + 1] float32."""
    out = np.empty((len(rows), rows.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = rows
    out[:, -1] = extra
    return out


def train_index(index: faiss.Index, vectors: np.ndarray, spec: str) -> None:
    """Train `index` on the item vectors, turning too-few-vectors failures into a PixelrecError."""
    if index.is_trained:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        check_training_size(spec, len(vectors), ivf.nlist)
        if len(vectors) < 39 * ivf.nlist:
            log(f"index {spec}: {len(vectors)} vectors for {ivf.nlist} lists (FAISS advises >= {39 * ivf.nlist})")
            ivf.cp.min_points_per_centroid = 1  # already warned once above; keep FAISS quiet
    try:
        index.train(vectors)
    except RuntimeError as error:
        found = re.search(r"training points \((\d+)\).*clusters \((\d+)\)", str(error))
        if found:
            check_training_size(spec, int(found.group(1)), int(found.group(2)))
        raise PixelrecError(f"training index {spec!r} failed: {faiss_message(error)}") from None


def check_training_size(spec: str, available: int, needed: int) -> None:
    if available >= needed:
        return
    smaller = 2 ** int(np.log2(available / 39)) if available >= 39 else 0
    hint = f"fewer centroids (e.g. 'IVF{smaller},Flat') or 'Flat'" if smaller else "'Flat'"
    raise PixelrecError(
        f"index spec {spec!r} needs at least {needed} item vectors to train {needed} centroids, "
        f"but there are only {available}; use {hint}"
    )


# Search breadth when the user gives none (FAISS's own defaults, nprobe 1 and efSearch 16, lose
# much of the exact top-k): probe up to 16 lists, efSearch 64.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64


def default_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> tuple[int | None, int | None]:
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is None and ivf is not None:
        nprobe = min(int(ivf.nlist), DEFAULT_NPROBE)
    if ef_search is None and find_hnsw(index) is not None:
        ef_search = DEFAULT_EF_SEARCH
    return nprobe, ef_search


def apply_search_params(index: faiss.Index, spec: str, nprobe: int | None, ef_search: int | None, gpu: bool = False) -> None:
    """Apply nprobe / efSearch through FAISS's ParameterSpace (GpuParameterSpace for a GPU index)."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value, applies_to in (("nprobe", nprobe, "IVF"), ("efSearch", ef_search, "HNSW")):
        if value is None:
            continue
        if int(value) != value or value < 1:
            raise PixelrecError(f"{name} must be a positive integer, got {value}")
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise PixelrecError(f"{name} applies to {applies_to} indexes only, not to {spec!r}") from None


def read_search_params(index: faiss.Index) -> dict[str, int | None]:
    """Effective search parameters of a CPU index (None where they do not apply)."""
    ivf = faiss.try_extract_index_ivf(index)
    hnsw = find_hnsw(index)
    return {"nprobe": int(ivf.nprobe) if ivf is not None else None,
            "ef_search": int(hnsw.hnsw.efSearch) if hnsw is not None else None}


def find_hnsw(index: faiss.Index) -> Any:
    """The HNSW index inside `index` (through IDMap / PreTransform wrappers), or None."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexHNSW):
            return index
        inner = getattr(index, "index", None)
        if inner is None:
            return None
        index = faiss.downcast_index(inner)


def faiss_message(error: Exception) -> str:
    """FAISS's C++ exception text without the 'Error in <function> at <file>:<line>:' prefix."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    message = re.sub(r"^Error in .*? at \S+:\d+: ", "", message)
    if "'metric == METRIC_L2' failed" in message:
        return (f"this index type supports only L2 distance, not inner product (prefix the spec with "
                f"'{IP_TO_L2},' to search inner products as L2 distances)")
    return re.sub(r"^Error: '.*?' failed: ", "", message)


# --------------------------------------------------------------------------------- device
def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def exact_device(device: str, gpu_layout: str) -> torch.device | None:
    """Where an exact index searches with `ExactSearch` (torch; no faiss-gpu needed): the CPU or one
    GPU. None for "cuda" on a machine with several GPUs: FAISS's multi-GPU Flat (`place`)."""
    if gpu_layout not in GPU_LAYOUTS:
        raise PixelrecError(f"unknown GPU layout {gpu_layout!r}; expected one of {', '.join(GPU_LAYOUTS)}")
    target = resolve_device(device)
    if target.type != "cuda":
        return torch.device("cpu")
    if target.index is None and torch.cuda.device_count() > 1:
        return None
    return torch.device("cuda", target.index or 0)


def place_index(index: faiss.Index, device: str, spec: str, gpu_layout: str = "shard") -> tuple[faiss.Index, str, Any]:
    """(index to search, device name, GPU resources to keep alive) for the requested device."""
    if gpu_layout not in GPU_LAYOUTS:
        raise PixelrecError(f"unknown GPU layout {gpu_layout!r}; expected one of {', '.join(GPU_LAYOUTS)}")
    target = resolve_device(device)
    if target.type != "cuda":
        return index, "cpu", None
    if not faiss_has_gpu():
        if device == "auto":
            return index, "cpu", None
        raise PixelrecError(f"--device {device}: this FAISS build has no GPU support; "
                            f"install pixelrec[gpu] (faiss-gpu) or use --device cpu")
    if target.index is None and faiss.get_num_gpus() > 1:
        return place_on_all_gpus(index, spec, gpu_layout)
    gpu = target.index or 0
    resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(resources, gpu, index), f"cuda:{gpu}", resources
    except RuntimeError as error:
        log(f"index {spec} cannot run on the GPU ({faiss_message(error)}); searching on the CPU")
        return index, "cpu", None


def place_on_all_gpus(index: faiss.Index, spec: str, gpu_layout: str) -> tuple[faiss.Index, str, Any]:
    """The index over every visible GPU with FAISS's own multi-GPU cloning: split into one shard per
    GPU (the catalogue may be larger than one GPU) or one copy per GPU (more queries per second).
    Exact (Flat) results equal the CPU index's. Not exercised without several GPUs."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = gpu_layout == "shard"
    try:
        placed = faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as error:
        log(f"index {spec} cannot run on the GPUs ({faiss_message(error)}); searching on the CPU")
        return index, "cpu", None
    return placed, f"cuda:all ({faiss.get_num_gpus()} GPUs, {gpu_layout})", None
