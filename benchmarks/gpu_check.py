"""The sections of `benchmarks/gpu_check.sh`: every figure still owed to a GPU, one section at a time.

    python benchmarks/gpu_check.py SECTION --out DIR [--dry-run]     # one section -> DIR/sections/SECTION.json
    python benchmarks/gpu_check.py report --out DIR                  # DIR/gpu_check.json + DIR/gpu_check.md

Sections (each run in its own process by gpu_check.sh, under its own time limit):

    env        the machine: torch, CUDA, GPUs, FAISS and its GPU support
    encode     images/s of ViT-B-32 at 224 px, the model alone against the whole encode pipeline,
               with AMP and without (benchmarks/encode_throughput.py measures the same on a CPU)
    fit        s/epoch of `partial` against `e2e`, top 2 blocks trained, with AMP and without
               (benchmarks/fit_cost.py's setting: 300 users x 150 items)
    faiss      FAISS Flat and IVF on the GPU against the CPU, and whether Flat's results are equal
               (skipped, with a note, when FAISS has no GPU support); the exact search
               (`ItemIndex.search`, torch on the GPU) per batch size against FAISS's GPU Flat and a
               plain torch.mm + topk, and whether its results are identical for every batch size
    pixel200k  a Pixel200K-shaped epoch of `id` and `partial` (benchmarks/pixel200k.py's data)
    torchrun   `fit` under `python -m torch.distributed.run --nproc-per-node 2` against one process
               (skipped with one GPU)

A section writes its JSON after every measurement, so a section stopped by its time limit keeps
what it measured; `failed` marks such a section. `--dry-run` uses tiny sizes, the tiny ViT and the
CPU, so the whole script can be checked without a GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

SECTIONS = ("env", "encode", "fit", "faiss", "pixel200k", "torchrun")
BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """How big each section's work is: the real check, or the dry run."""

    model: str  # image encoder of encode and fit
    image_size: int
    covers: int  # encode: synthetic covers
    cover_side: int
    batch_size: int
    workers: int
    fit_users: int
    fit_items: int
    fit_epochs: int
    faiss_items: int
    faiss_queries: int
    faiss_ivf: str
    pixel200k_scale: float
    torchrun_users: int
    torchrun_items: int
    device: str


REAL = Sizes(model="ViT-B-32", image_size=224, covers=2048, cover_side=256, batch_size=256, workers=8,
             fit_users=300, fit_items=150, fit_epochs=2, faiss_items=1_000_000, faiss_queries=5_000,
             faiss_ivf="IVF1024,Flat", pixel200k_scale=0.2, torchrun_users=2000, torchrun_items=1000, device="cuda")
DRY = Sizes(model="pixelrec-tiny-vit", image_size=32, covers=32, cover_side=48, batch_size=16, workers=0,
            fit_users=40, fit_items=20, fit_epochs=1, faiss_items=4000, faiss_queries=200,
            faiss_ivf="IVF32,Flat", pixel200k_scale=0.001, torchrun_users=40, torchrun_items=20, device="cpu")


class Section:
    """One section's results, saved to OUT/sections/NAME.json after every change."""

    def __init__(self, out: Path, name: str, dry_run: bool):
        self.path = out / "sections" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"name": name, "status": "running", "dry_run": dry_run, "notes": [], "rows": []}
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def row(self, **values: Any) -> None:
        self.data["rows"].append(values)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def finish(self, status: str = "ok") -> None:
        self.data["status"] = status
        self.save()


# --------------------------------------------------------------------------------- env
def section_env(sec: Section, sizes: Sizes, work: Path) -> None:
    import faiss
    import torch

    import pixelrec

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    values = {"python": platform.python_version(), "pixelrec": pixelrec.__version__, "torch": torch.__version__,
              "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpus": len(gpus),
              "gpu_names": ", ".join(gpus) or "-", "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
              "faiss": faiss.__version__, "faiss_gpus": faiss_gpus(), "cpu_cores": os.cpu_count(),
              "device_used": sizes.device}
    for key, value in values.items():
        sec.row(item=key, value=value)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


# --------------------------------------------------------------------------------- encode
def section_encode(sec: Section, sizes: Sizes, work: Path) -> None:
    import torch

    from encode_throughput import make_covers
    from pixelrec.data.images import open_image_store
    from pixelrec.encode import EncodeConfig, EncoderConfig, build_encoder, encode_images
    from pixelrec.runtime import resolve_device, set_quiet

    set_quiet(True)
    device = resolve_device(sizes.device)
    covers = work / "encode-covers"
    covers.mkdir(parents=True, exist_ok=True)
    if not any(covers.iterdir()):
        make_covers(covers, sizes.covers, sizes.cover_side)
    enc_cfg = EncoderConfig(model=sizes.model, image_size=sizes.image_size)
    encoder = build_encoder(enc_cfg, device)
    store = open_image_store(covers)
    loader = encoder.pixel_loader(store)
    pixels = torch.stack([loader(i) for i in store.ids()]).to(device)
    sec.note(f"{sizes.model} random init at {encoder.image_size} px, {sizes.covers} JPEG covers of "
             f"{sizes.cover_side} px, batch {sizes.batch_size}, {sizes.workers} decoding workers, device {device}")
    for amp in (True, False):
        model = max(forward_rate(encoder, pixels, sizes.batch_size, device, amp) for _ in range(2))
        config = EncodeConfig(images=str(covers), out=str(work / "encode.h5"), encoder=enc_cfg,
                              batch_size=sizes.batch_size, num_workers=sizes.workers, device=str(device),
                              overwrite=True, precision="auto" if amp else "fp32")
        pipeline = max(encode_images(config, encoder=encoder).images_per_s for _ in range(2))
        sec.row(precision="AMP" if amp else "fp32", model_alone_img_s=round(model, 1),
                pipeline_img_s=round(pipeline, 1), pipeline_vs_model=round(pipeline / model, 3))
    amp_row, fp32_row = sec.data["rows"]
    sec.note(f"AMP speed-up: model {amp_row['model_alone_img_s'] / fp32_row['model_alone_img_s']:.2f}x, "
             f"pipeline {amp_row['pipeline_img_s'] / fp32_row['pipeline_img_s']:.2f}x (no autocast on a CPU)")


def forward_rate(encoder, pixels, batch_size: int, device, amp: bool) -> float:
    """images/s of the encoder alone on pixels already on the device, with or without autocast."""
    import torch

    from pixelrec.runtime import autocast_for

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast_for(device, "auto" if amp else "fp32"):
        encoder(pixels[:batch_size])
        sync()
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            encoder(pixels[start:start + batch_size]).float()
        sync()
    return len(pixels) / (time.perf_counter() - started)


# --------------------------------------------------------------------------------- fit
def synth_data(directory: Path, users: int, items: int, image_size: int) -> Path:
    """pixelrec's synthetic catalogue (covers + interactions) in `directory`, made once."""
    from pixelrec.data.synth import SynthConfig, synthesize

    if not (directory / "interactions.csv").is_file():
        cold = max(1, items // 20)
        synthesize(directory, SynthConfig(users=users, items=items, cold_items=cold, styles=6, image_size=image_size,
                                          min_len=5, max_len=min(40, items - cold)))
    return directory


def section_fit(sec: Section, sizes: Sizes, work: Path) -> None:
    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images
    from pixelrec.runtime import set_quiet

    set_quiet(True)
    data = synth_data(work / "fit-data", sizes.fit_users, sizes.fit_items, max(sizes.image_size, 32))
    cache = work / "fit-cache.h5"
    encode_images(EncodeConfig(images=str(data / "covers"), out=str(cache), interactions=str(data / "interactions.csv"),
                               encoder=EncoderConfig(model=sizes.model, image_size=sizes.image_size), split_block=2,
                               device=sizes.device, num_workers=sizes.workers, overwrite=True, hidden="cls"))
    sec.note(f"{sizes.model} at {sizes.image_size} px, top 2 blocks trained (side: every layer's class token), {sizes.fit_users} users x "
             f"{sizes.fit_items} items, {sizes.fit_epochs} epoch(s), SASRec d 64, batch 64; s/epoch = training "
             f"time of the last epoch")
    for kind in ("partial", "e2e", "side"):  # side last: the new row, so a time-out loses only it
        for amp in (True, False):
            sec.row(**fit_once(kind, amp, data, cache, work / f"fit-{kind}-{'amp' if amp else 'fp32'}", sizes))
    rows = {(r["tower"], r["precision"]): r["s_per_epoch"] for r in sec.data["rows"]}
    for precision in ("AMP", "fp32"):
        for kind in ("partial", "side"):
            sec.note(f"{precision}: {kind} takes {rows[(kind, precision)] / rows[('e2e', precision)]:.3f}x "
                     f"the epoch time of e2e")


def fit_once(kind: str, amp: bool, data: Path, cache: Path, out: Path, sizes: Sizes) -> dict[str, Any]:
    """One fit in this process: last epoch's training seconds, peak CUDA memory, test NDCG@10."""
    import torch

    from pixelrec.recommend.config import FitConfig
    from pixelrec.runs.fit import fit

    cfg = FitConfig(interactions=str(data / "interactions.csv"), out=str(out))
    cfg.items.kind = kind
    if kind in ("partial", "side"):
        cfg.items.cache = str(cache)
    else:
        cfg.items.images, cfg.items.encoder, cfg.items.tune_blocks = str(data / "covers"), sizes.model, 2
        cfg.items.image_size = sizes.image_size
    cfg.train.epochs, cfg.train.patience, cfg.train.batch_size = sizes.fit_epochs, sizes.fit_epochs, 64
    cfg.train.device, cfg.train.precision = sizes.device, "auto" if amp else "fp32"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = fit(cfg, overwrite=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"tower": kind, "precision": "AMP" if amp else "fp32", "s_per_epoch": round(last["train_seconds"], 3),
            "fit_s_per_epoch": round(result.seconds_per_epoch, 3), "peak_cuda_mb": round(peak),
            "test_ndcg@10": round(result.test["overall"]["ndcg@10"], 4)}


# --------------------------------------------------------------------------------- faiss
def section_faiss(sec: Section, sizes: Sizes, work: Path) -> None:
    from pixelrec.index.faiss_index import ItemIndex
    from pixelrec.index.tuning import recall_at_k
    from pixelrec.runtime import set_quiet
    from retrieval import synthetic

    set_quiet(True)
    items, ids, queries, histories = synthetic(sizes.faiss_items, 64, sizes.faiss_queries, 20, 0)
    sec.note(f"{sizes.faiss_items:,} items x d 64 (benchmarks/retrieval.py's clustered vectors), "
             f"{sizes.faiss_queries:,} queries, k 10, 20 excluded items per query; {sizes.faiss_ivf} nprobe 32")
    gpu = faiss_gpus() > 0
    if not gpu:
        sec.note("skipped the GPU rows: this FAISS build has no GPU support (install faiss-gpu: pixelrec[gpu]); "
                 "the CPU rows ran")
    devices = ["cpu"] + (["cuda"] if gpu else [])  # exact search on the GPU needs no faiss-gpu: see above
    exact: dict[str, tuple] = {}
    for spec in ("Flat", sizes.faiss_ivf):
        for device in devices:
            built = time.perf_counter()
            index = ItemIndex.build(items, ids, spec=spec, nprobe=None if spec == "Flat" else 32, device=device)
            build_s = time.perf_counter() - built
            seconds, (scores, found) = best_time(lambda: index.search(queries, 10, exclude=histories))
            if spec == "Flat":
                exact[device] = (scores, found)
            cpu_rows = [r for r in sec.data["rows"] if r["index"] == spec and r["device"] == "cpu"]
            row = {"index": spec, "device": index.device, "queries_per_s": round(len(queries) / seconds, 1),
                   "x_cpu": round(cpu_rows[0]["seconds"] / seconds, 2) if cpu_rows else 1.0,
                   "recall@10": round(recall_at_k(found, exact["cpu"][1]), 4), "build_s": round(build_s, 2),
                   "seconds": round(seconds, 4)}
            if spec == "Flat" and device != "cpu":
                row["flat_equal_to_cpu"] = bool(np.array_equal(found, exact["cpu"][1])
                                                and np.allclose(scores, exact["cpu"][0], rtol=1e-4, atol=1e-4))
                # canonical scores (pixelrec/index/exact.py) are the same bits whichever device found them
                row["flat_bits_equal_to_cpu"] = bool(np.array_equal(found, exact["cpu"][1])
                                                     and scores.tobytes() == exact["cpu"][0].tobytes())
            sec.row(**row)
    exact_search_rows(sec, items, ids, queries, histories, sizes.device, gpu)


def exact_search_rows(sec: Section, items: np.ndarray, ids: np.ndarray, queries: np.ndarray, histories: list,
                      device: str, faiss_gpu: bool) -> None:
    """Rows of the exact search on `device`: queries/s per batch size of `ItemIndex.search` (torch,
    pixelrec/index/exact.py), FAISS's Flat on the same device (GPU: only with faiss-gpu) and a
    plain torch.mm + topk; then whether batches of 1, 7, 64 and all give identical ids and scores."""
    import faiss
    import torch

    from pixelrec.index.faiss_index import ItemIndex
    from retrieval import exact_methods, rate

    index = ItemIndex.build(items, ids, device=device)
    methods = exact_methods(index, items, 10)
    if device != "cpu":
        gpu_flat = None
        if faiss_gpu:
            resources = faiss.StandardGpuResources()
            gpu_flat = faiss.index_cpu_to_gpu(resources, 0, index._index)
        del methods["FAISS Flat (before)"]  # ItemIndex keeps FAISS on the CPU for Flat: time FAISS's GPU Flat
        if gpu_flat is not None:  # its raw search of the over-fetch 20 excluded ids need (k + 32 + 1), no filter
            methods["FAISS GPU Flat, raw k+33"] = lambda q, h: gpu_flat.search(q, 10 + 32 + 1)
    for batch in (1, 8, 64, 512, 4096):
        row = {"index": "Flat", "device": index.device, "batch": batch}
        for name, search in methods.items():
            if search is not None:
                row[f"{name} q/s"] = round(rate(search, queries, histories, min(batch, len(queries)), 0.5), 1)
        sec.row(**row)
    torch.cuda.synchronize() if device != "cpu" else None
    scores, found = index.search(queries, 10, exclude=histories)
    some = min(len(queries), 256)  # batch 1 and 7 on the first 256 queries (time)
    same = True
    for batch, users in ((1, some), (7, some), (64, len(queries))):
        parts = [index.search(queries[s:min(s + batch, users)], 10, exclude=histories[s:min(s + batch, users)])
                 for s in range(0, users, batch)]
        same &= np.array_equal(np.concatenate([p[1] for p in parts]), found[:users])
        same &= np.concatenate([p[0] for p in parts]).tobytes() == scores[:users].tobytes()
    sec.row(index="Flat", device=index.device, identical_for_batches_1_7_64_all=bool(same))


def best_time(call: Callable[[], Any], repeat: int = 2) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


# --------------------------------------------------------------------------------- pixel200k
def section_pixel200k(sec: Section, sizes: Sizes, work: Path) -> None:
    import torch

    import pixel200k

    root = work / f"pixel200k-{sizes.pixel200k_scale:g}"
    if not (root / "interactions.csv").is_file():
        started = time.perf_counter()
        shape = pixel200k.synthesise(root, sizes.pixel200k_scale)
        sec.note(f"scale {sizes.pixel200k_scale:g} of Pixel200K: {shape['users']:,} users, {shape['items']:,} items, "
                 f"{shape['interactions']:,} interactions (synthesised in {time.perf_counter() - started:.0f} s); "
                 f"`--softmax auto` samples the softmax once the full one would dominate a step, so every epoch "
                 f"grows linearly with the scale")
    for stage in pixel200k.with_prerequisites(["fit-id", "fit-partial"]):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        output = pixel200k.run_stage(stage, root, sizes.device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        sec.row(stage=stage, wall_s=round(time.perf_counter() - started, 2), peak_cuda_mb=round(peak),
                train_s=output.get("train_seconds", "-"), epoch_s=output.get("epoch_seconds", "-"))


# --------------------------------------------------------------------------------- torchrun
def section_torchrun(sec: Section, sizes: Sizes, work: Path, dry_run: bool) -> None:
    import torch

    from pixelrec.encode import EncodeConfig, EncoderConfig, encode_images
    from pixelrec.runtime import set_quiet

    if not dry_run and torch.cuda.device_count() < 2:
        sec.finish("skipped")
        sec.note(f"{torch.cuda.device_count()} GPU(s): the 2-process path needs 2")
        return
    set_quiet(True)
    data = synth_data(work / "torchrun-data", sizes.torchrun_users, sizes.torchrun_items, 64)
    towers = {"id": []}
    if not dry_run:  # partial all-reduces the image blocks' gradients too
        cache = work / "torchrun-cache.h5"
        encode_images(EncodeConfig(images=str(data / "covers"), out=str(cache), interactions=str(data / "interactions.csv"),
                                   encoder=EncoderConfig(model=sizes.model, image_size=64), split_block=2,
                                   device=sizes.device, num_workers=sizes.workers, overwrite=True))
        towers["partial"] = ["--items", "partial", "--cache", str(cache)]
    sec.note(f"`python -m torch.distributed.run --standalone --nproc-per-node N -m pixelrec fit`, "
             f"{sizes.torchrun_users} users x {sizes.torchrun_items} items, 1 epoch, device {sizes.device}"
             + ("; dry run: 2 CPU processes only, to check the path" if dry_run else ""))
    for tower, extra in towers.items():
        for nproc in ([2] if dry_run else [1, 2]):
            out = work / f"torchrun-{tower}-{nproc}"
            wall = torchrun_fit(nproc, data / "interactions.csv", out, sizes.device, extra)
            epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            sec.row(tower=tower, processes=nproc, s_per_epoch=round(epoch["train_seconds"], 3), wall_s=round(wall, 1))


def torchrun_fit(nproc: int, interactions: Path, out: Path, device: str, extra: list[str]) -> float:
    """Wall seconds of one `fit` under torchrun with `nproc` processes (an error if it fails)."""
    env = {**os.environ, "PIXELREC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "pixelrec", "fit", "--interactions", str(interactions), "--out", str(out), "--overwrite",
           "--epochs", "1", "--device", device, "--batch-size", "64", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"torchrun fit failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started


# --------------------------------------------------------------------------------- report
def mark_failed(out: Path, name: str, rc: int, log: Path) -> None:
    """A section that did not finish: keep what it measured, say why it stopped."""
    path = out / "sections" / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"name": name, "notes": [], "rows": []}
    if data.get("status") in ("ok", "skipped"):
        return
    data["status"] = "timeout" if rc in (124, 137) else "failed"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    data["notes"] = data.get("notes", []) + [f"stopped with exit status {rc}" + (": " + " | ".join(tail) if tail else "")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def report(out: Path, dry_run: bool) -> None:
    """Merge the sections into OUT/gpu_check.json and OUT/gpu_check.md (one table per section)."""
    sections = {}
    for name in SECTIONS:
        path = out / "sections" / f"{name}.json"
        sections[name] = json.loads(path.read_text()) if path.is_file() else \
            {"name": name, "status": "missing", "notes": ["the section did not run"], "rows": []}
    result = {"dry_run": dry_run, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "sections": sections}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    lines = [f"# GPU check{' (dry run: tiny sizes, CPU)' if dry_run else ''}", "",
             "| section | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '-')} |" for name, s in sections.items()]
    for name, s in sections.items():
        lines += ["", f"## {name}", ""] + [f"- {note}" for note in s["notes"]]
        lines += markdown_table(s["rows"])
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=SECTIONS + ("report", "failed"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--section", help="failed: the section")
    parser.add_argument("--rc", type=int, default=1, help="failed: its exit status")
    args = parser.parse_args()
    out = Path(args.out)
    if args.command == "report":
        return report(out, args.dry_run)
    if args.command == "failed":
        return mark_failed(out, args.section, args.rc, out / "logs" / f"{args.section}.log")
    sizes = DRY if args.dry_run else REAL
    if args.dry_run:  # tiny work on a CPU: one thread is fastest and steadiest (gpu_check.sh sets the same)
        import torch

        torch.set_num_threads(1)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    sec = Section(out, args.command, args.dry_run)
    run = {"env": section_env, "encode": section_encode, "fit": section_fit, "faiss": section_faiss,
           "pixel200k": section_pixel200k}.get(args.command)
    if run is None:
        section_torchrun(sec, sizes, work, args.dry_run)
    else:
        run(sec, sizes, work)
    if sec.data["status"] == "running":
        sec.finish()


if __name__ == "__main__":
    main()
