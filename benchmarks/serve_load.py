"""Load test of `pixelrec serve`: throughput and latency under 1, 8 and 64 concurrent clients, with
and without micro-batching, and covers ingested while queries run.

It starts `pixelrec serve RUN --port 0` on 127.0.0.1 as a subprocess (the port is read from its
startup line), sends every request to that address only, and stops the server itself. Each
configuration is bounded by a number of requests and a number of seconds. Clients are asyncio
tasks in this process, each with its own httpx.AsyncClient (one keep-alive connection), so they
share the machine's cores with the server.

Printed per configuration: requests, throughput, client-side p50 / p99 latency, errors, and the
ratio of the throughput to calling the library in-process with the run already loaded (one query
at a time: `model.encode_histories` + `index.search`, what `retrieve_one` does after loading the
run). The cost of `retrieve_one` itself, which loads the run for every call as `pixelrec
retrieve` does, is printed too.

The ingestion phase uploads covers (POST /items) while 8 clients query with k = the catalogue
size, and checks that no query fails and that none comes from a half-updated index: answers to one
query at one index version are all identical, an answer never holds an item added in a later
version, the first version's answers equal the library's before any addition and the last
version's equal the library's after the last one.

Without --run it builds a tiny synthetic run first (synth -> encode with pixelrec-tiny-vit on 32 px
covers -> fit a frozen-tower SASRec), in a temporary directory:

    python benchmarks/serve_load.py                      # about 3 minutes on 2 cores
    python benchmarks/serve_load.py --run runs/frozen --requests 2000 --seconds 30

`--flat-items N` measures instead the part of a served query that grows with the catalogue, at a
size no quick run reaches: a Flat `ItemIndex` over N random 64-dimensional items (ids 1..N) behind
the server's own `MicroBatcher` (window `--windows`' last value, the server's default max batch
256), with 8 and 64 (`--clients`) concurrent asyncio clients, each sending one query vector with
20 excluded items at a time; no HTTP and no user tower. Each configuration runs with FAISS's Flat
search (`search_with_faiss`, the path before) and with `ItemIndex.search` (today's exact path):

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --flat-items 1000000 --clients 8,64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.trained import load_trained
from pixelrec.runtime import set_quiet

HOST = "127.0.0.1"  # the only address this benchmark sends traffic to


@dataclass
class Load:
    """What one configuration measured."""

    clients: int
    window_ms: float
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    mean_batch: float | None = None

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run (default: build a tiny synthetic one)")
    parser.add_argument("--covers", help="covers to ingest (default: synthesize new ones; needs an image run)")
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    parser.add_argument("--windows", default="0,2", help="--batch-window-ms values, comma-separated (0 = off)")
    parser.add_argument("--requests", type=int, default=1500, help="most requests per configuration")
    parser.add_argument("--seconds", type=float, default=15.0, help="most seconds per configuration")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--uploads", type=int, default=4, help="POST /items requests in the ingestion phase")
    parser.add_argument("--per-upload", type=int, default=3, help="covers per upload")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads of the server and of the in-process library (0 = their default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flat-items", type=int, default=0,
                        help="measure the micro-batched search over a Flat index of this many items instead")
    return parser.parse_args()


# ------------------------------------------------------------------------------------ data
def build_run(work: Path) -> Path:
    """A tiny frozen-tower run on synthetic covers, through the public API."""
    from pixelrec.data.synth import SynthConfig, synthesize
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images
    from pixelrec.recommend.config import FitConfig, ItemsConfig, SequenceConfig, TrainConfig
    from pixelrec.runs.fit import fit

    data = synthesize(work / "data", SynthConfig(users=1000, items=300, cold_items=20, styles=8, image_size=32,
                                                 max_len=30, seed=1))
    cache = work / "cache.h5"
    encode_images(EncodeConfig(images=str(data.covers), out=str(cache), num_workers=0, device="cpu",
                               encoder=EncoderConfig(model="pixelrec-tiny-vit")))
    cfg = FitConfig(interactions=str(data.interactions), out=str(work / "run"),
                    items=ItemsConfig(kind="frozen", cache=str(cache)),
                    model=SequenceConfig(dim=32, max_len=20, layers=1, heads=2),
                    train=TrainConfig(epochs=3, batch_size=64, device="cpu", seed=0, patience=100))
    return fit(cfg).run_dir


def new_covers(work: Path, count: int) -> Path:
    """`count` covers of items no run knows (ids n00000...)."""
    from pixelrec.data.synth import SynthConfig, synthesize

    src = synthesize(work / "new", SynthConfig(users=30, items=max(count, 20) + 4, cold_items=0, styles=8,
                                               image_size=32, max_len=20, seed=5, item_prefix="n"))
    return Path(src.covers)


# ------------------------------------------------------------------------------------ server
class Server:
    """`pixelrec serve` in a subprocess on 127.0.0.1, any free port."""

    def __init__(self, run: Path, window_ms: float, log: Path, threads: int):
        self.log = log
        command = [sys.executable, "-m", "pixelrec", "-q", "serve", str(run), "--host", HOST, "--port", "0",
                   "--batch-window-ms", str(window_ms)]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(rf"on (http://{re.escape(HOST)}:\d+)", self.log.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise SystemExit(f"the server stopped: {self.log.read_text()}")
            time.sleep(0.1)
        raise SystemExit("the server did not start in time")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------ load
async def run_load(url: str, bodies: list[dict], clients: int, window_ms: float, max_requests: int,
                   max_seconds: float) -> Load:
    """`clients` tasks posting /recommend bodies in turn until max_requests are sent or max_seconds pass."""
    result = Load(clients, window_ms)
    sessions = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(clients)]  # one connection each
    try:
        for session in sessions:
            await session.get("/health")  # connect before timing
        before = (await sessions[0].get("/stats")).json()
        sent = 0
        started = time.perf_counter()
        deadline = started + max_seconds

        async def one_client(session: httpx.AsyncClient, seed: int) -> None:
            nonlocal sent
            rng = random.Random(seed)
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                try:
                    ok = (await session.post("/recommend", json=rng.choice(bodies))).status_code == 200
                except httpx.HTTPError:
                    ok = False
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                result.requests += 1
                result.errors += not ok

        await asyncio.gather(*(one_client(session, i) for i, session in enumerate(sessions)))
        result.seconds = time.perf_counter() - started
        after = (await sessions[0].get("/stats")).json()
    finally:
        await asyncio.gather(*(session.aclose() for session in sessions))
    batches = after["batches"] - before["batches"]
    result.mean_batch = (after["queries"] - before["queries"]) / batches if batches else None
    return result


def in_process_rate(run: Path, bodies: list[dict], seconds: float = 5.0) -> tuple[float, float]:
    """(queries/s, median ms) of the library in-process, run loaded once, one query at a time."""
    trained = load_trained(str(run))
    items = {str(n): i for i, n in enumerate(trained.item_names) if i > 0}
    histories = [np.asarray(trained.data.history(trained.data.user_index[b["user_id"]], "all")) if "user_id" in b
                 else np.array([items[n] for n in b["history"]]) for b in bodies]
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = -20  # warm-up queries, not timed
    while time.perf_counter() < deadline:
        hist, k = histories[i % len(histories)], bodies[i % len(bodies)].get("k", 10)
        t0 = time.perf_counter()
        vec = trained.model.encode_histories([hist], item_table=trained.table)
        trained.index.search(vec, k, exclude=[hist])
        if i >= 0:
            times.append(time.perf_counter() - t0)
        i += 1
    return len(times) / sum(times), 1000 * float(np.median(times))


def retrieve_one_cost(run: Path, user: str, calls: int = 3) -> float:
    """Seconds per `retrieve_one` call (it loads the run every time, as `pixelrec retrieve` does)."""
    started = time.perf_counter()
    for _ in range(calls):
        retrieve_one(str(run), user=user, k=10)
    return (time.perf_counter() - started) / calls


# ------------------------------------------------------------------------------------ ingestion
@dataclass
class Ingestion:
    queries: int = 0
    failed: int = 0
    half_updated: int = 0
    versions: int = 0
    uploads_ok: int = 0
    added: int = 0


async def ingest_during_load(url: str, run: Path, covers: Path, bodies: list[dict], uploads: int, per_upload: int,
                             clients: int = 8) -> Ingestion:
    """Upload covers while `clients` query full rankings; check every answer comes from one whole index."""
    size = (await _get_json(url, "/health"))["items"]
    probes = [dict(b, k=size) for b in bodies[:6]]
    library_before = [_library_answer(run, b) for b in probes]
    files = sorted(covers.iterdir())[: uploads * per_upload]
    seen: dict[tuple[int, int], set[tuple]] = {}
    added_at: dict[int, set[str]] = {}
    report = Ingestion()
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        first_version = (await client.get("/health")).json()["index_version"]

        async def query_loop(offset: int) -> None:
            i = offset
            while not done.is_set():
                probe = i % len(probes)
                report.queries += 1
                try:
                    r = await client.post("/recommend", json=probes[probe])
                    answer = r.json() if r.status_code == 200 else None
                except httpx.HTTPError:
                    answer = None
                if answer is None:
                    report.failed += 1
                else:
                    key = (answer["index_version"], probe)
                    seen.setdefault(key, set()).add((tuple(answer["items"]), tuple(answer["scores"])))
                i += 1

        async def upload_loop() -> None:
            for u in range(uploads):
                await asyncio.sleep(0.3)
                part = files[u * per_upload:(u + 1) * per_upload]
                r = await client.post("/items", files=[("covers", (f.name, f.read_bytes())) for f in part])
                if r.status_code in (200, 201):
                    report.uploads_ok += 1
                    body = r.json()
                    added_at[body["index_version"]] = {a["item_id"] for a in body["added"]}
                    report.added += len(body["added"])
            await asyncio.sleep(0.3)
            done.set()

        await asyncio.gather(upload_loop(), *(query_loop(i) for i in range(clients)))
    library_after = [_library_answer(run, b) for b in probes]
    last_version = max(v for v, _ in seen)
    for (version, probe), answers in seen.items():
        later = set().union(*(names for v, names in added_at.items() if v > version))
        wrong = len(answers) > 1 or any(later & set(items) for items, _ in answers)
        if version == first_version:
            wrong |= answers != {library_before[probe]}
        if version == last_version:
            wrong |= answers != {library_after[probe]}
        report.half_updated += wrong
    report.versions = len({v for v, _ in seen})
    return report


async def _get_json(url: str, path: str) -> dict:
    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get(path)).json()


def _library_answer(run: Path, body: dict) -> tuple:
    r = retrieve_one(str(run), user=body.get("user_id"), history=body.get("history"), k=body["k"])
    return tuple(r.items), tuple(r.scores)


# ------------------------------------------------------------------------------------ main
def query_bodies(run: Path, k: int, seed: int, count: int = 200) -> list[dict]:
    """A mix of user queries (3 in 4) and ad-hoc histories of 1-5 items."""
    rng = random.Random(seed)
    users = (run / "users.txt").read_text().split("\n")[:-1]
    items = (run / "items.txt").read_text().split("\n")[1:-1]
    return [{"user_id": rng.choice(users), "k": k} if rng.random() < 0.75
            else {"history": rng.sample(items, rng.randint(1, 5)), "k": k} for _ in range(count)]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


# ------------------------------------------------------------------------------------ --flat-items
async def batched_load(compute, clients: int, window_ms: float, queries: np.ndarray, histories: list,
                       max_requests: int, max_seconds: float) -> Load:
    """`clients` tasks submitting one query at a time to a MicroBatcher over `compute`."""
    from concurrent.futures import ThreadPoolExecutor

    from pixelrec.runs.serving.batching import MicroBatcher

    result = Load(clients, window_ms)
    batches: list[int] = []
    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(compute, executor, window_ms / 1000, 256, on_batch=batches.append)
        started = time.perf_counter()
        deadline = started + max_seconds

        async def one_client(seed: int) -> None:
            rng = random.Random(seed)
            while result.requests < max_requests and time.perf_counter() < deadline:
                row = rng.randrange(len(queries))
                t0 = time.perf_counter()
                await batcher.submit([(queries[row], histories[row])])
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                result.requests += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
        result.seconds = time.perf_counter() - started
        await batcher.close()
    result.mean_batch = sum(batches) / len(batches) if batches else None
    return result


def flat_index_load(args: argparse.Namespace) -> None:
    """--flat-items: micro-batched exact search over a large Flat index, FAISS before against now."""
    from pixelrec.index.faiss_index import ItemIndex

    rng = np.random.default_rng(args.seed)
    n = args.flat_items
    started = time.perf_counter()
    index = ItemIndex.build(rng.standard_normal((n, 64), dtype=np.float32), np.arange(1, n + 1, dtype=np.int64))
    queries = rng.standard_normal((2000, 64), dtype=np.float32)
    histories = [rng.integers(1, n + 1, 20) for _ in range(len(queries))]
    window = [float(w) for w in args.windows.split(",")][-1]
    print(f"Flat index over {n:,} items, d 64 (built in {time.perf_counter() - started:.0f} s); micro-batching "
          f"window {window:g} ms, max batch 256, one query of k {args.k} and 20 excluded items per request; "
          f"{machine()}")
    paths = {"FAISS Flat (before)": index.search_with_faiss, "ItemIndex.search (now)": index.search}
    print("| clients | search | requests | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for clients in [int(c) for c in args.clients.split(",")]:
        for name, search in paths.items():
            def compute(batch, search=search):
                scores, ids = search(np.stack([q for q, _ in batch]), args.k, exclude=[h for _, h in batch])
                return list(zip(ids, scores))
            load = asyncio.run(batched_load(compute, clients, window, queries, histories, args.requests,
                                            args.seconds))
            batch = f"{load.mean_batch:.1f}" if load.mean_batch else "-"
            print(f"| {clients} | {name} | {load.requests} | {load.throughput:.1f} | {load.percentile(50):.0f} | "
                  f"{load.percentile(99):.0f} | {batch} |", flush=True)


def main() -> None:
    args = parse_args()
    set_quiet(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flat_items:
        flat_index_load(args)
        return
    work = Path(tempfile.mkdtemp(prefix="pixelrec-serve-load-"))
    try:
        started = time.perf_counter()
        run = Path(args.run) if args.run else build_run(work)
        print(f"run: {run} (built in {time.perf_counter() - started:.0f}s)" if not args.run else f"run: {run}")
        bodies = query_bodies(run, args.k, args.seed)
        rate, median = in_process_rate(run, bodies)
        cli_seconds = retrieve_one_cost(run, next(b["user_id"] for b in bodies if "user_id" in b))
        print(f"library in-process (run loaded once, one query at a time): {rate:.0f} queries/s, "
              f"median {median:.2f} ms; retrieve_one (loads the run per call): {cli_seconds:.2f} s/query")

        rows: list[Load] = []
        ingestions: list[tuple[float, Ingestion]] = []
        covers = Path(args.covers) if args.covers else None
        for window in [float(w) for w in args.windows.split(",")]:
            served = copy_of(run, work, window)  # ingestion changes the run: each server gets its own copy
            server = Server(served, window, work / f"server-{window:g}.log", args.threads)
            try:
                for clients in [int(c) for c in args.clients.split(",")]:
                    load = asyncio.run(run_load(server.url, bodies, clients, window, args.requests, args.seconds))
                    rows.append(load)
                    print(f"  window {window:g} ms, {clients} clients: {load.throughput:.0f} req/s", flush=True)
                if args.uploads:
                    if covers is None:
                        covers = new_covers(work, args.uploads * args.per_upload)
                    ingestions.append((window, asyncio.run(ingest_during_load(
                        server.url, served, covers, bodies, args.uploads, args.per_upload))))
            finally:
                server.stop()
        print()
        print(f"machine: {machine()}")
        print_table(rows, rate)
        for window, ing in ingestions:
            print(f"\ningestion during load (window {window:g} ms, 8 clients, k = catalogue): {ing.uploads_ok}/"
                  f"{args.uploads} uploads, {ing.added} covers added, {ing.versions} index versions seen, "
                  f"{ing.queries} queries, {ing.failed} failed, {ing.half_updated} answered from a half-updated "
                  f"index")
        if any(ing.failed or ing.half_updated or ing.uploads_ok < args.uploads for _, ing in ingestions):
            raise SystemExit("ingestion check failed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def copy_of(run: Path, work: Path, window: float) -> Path:
    target = work / f"served-{window:g}"
    shutil.copytree(run, target)
    return target


def print_table(rows: list[Load], library_rate: float) -> None:
    print("| clients | micro-batching | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors | "
          "mean batch | vs library in-process |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        batching = f"{r.window_ms:g} ms" if r.window_ms else "off"
        batch = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
        print(f"| {r.clients} | {batching} | {r.requests} | {r.throughput:.0f} | {r.percentile(50):.1f} | "
              f"{r.percentile(99):.1f} | {r.errors} | {batch} | {r.throughput / library_rate:.2f}x |")


if __name__ == "__main__":
    main()
