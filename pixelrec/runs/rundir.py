"""The run directory: what `fit` writes and `evaluate` / `retrieve` / `index` read.

    RUN_DIR/
      manifest.json            the published run: which checkpoint, index version and results belong
                               together (written last, atomically; readers trust only what it names)
      config.json              every setting, the data summary and fingerprint, pixelrec version
      items.txt users.txt      vocabularies (line i = index i; items.txt line 0 is [PAD])
      sequences.npz            every user's item indices in time order (CSR: offsets, items)
      metrics.jsonl            one line per finished epoch
      checkpoints/last.pt      model + optimiser + early-stopping state after the last finished epoch
      checkpoints/best-eNNNNN.pt  model weights of the best validation epoch NNNNN (never rewritten)
      index/vNNNN/             FAISS index of the item vectors, one immutable directory per version
                               (index.faiss, index.json, item_vectors.npy, item_ids.npy,
                               added_items.jsonl: names of items added after training)
      added/covers/            copies of the covers of items added with `pixelrec index --add-images`
      results.json             test metrics of the published model
      visrank.npy              (--model visrank only: no checkpoint, index or manifest) every item's
                               cached embedding, [N + 1, E] float32 (runs/visrank.py)

Publication: `fit` trains while the manifest still names the previous published model (if any);
it then writes a new index version, results.json, and last the manifest. A process killed at any
point leaves the previous consistent set named by the manifest. `index --spec/--add-images`
publish a new index version the same way. Readers that find files disagreeing with the manifest
refuse them and say which command repairs the run.

Every file is written atomically (temporary name, fsync, rename), so none is ever half-written.
Temporary files and directories a killed writer left behind (`.encode-*`, `index/.v-*.tmp`,
`.NAME.*.tmp`) are removed by the next command that takes the run's lock (`RunDir.lock`).

Every name in items.txt, users.txt and added_items.jsonl passes the id rule (`data.ids`) when
written and is checked again when read, so a damaged or hand-made file is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..data.ids import PAD, first_bad_id, shown
from ..data.sequences import SequenceData
from ..encode.cache import cache_identity
from ..errors import PixelrecError
from ..recommend.config import MODEL_SPECS, RETIRED_SETTINGS, FitConfig
from ..runtime import (FileLock, atomic_path, disk_full_error, file_sha256, fsync_path, load_tensors, lock_path_for, log,
                       save_tensors, write_json)

RUN_FORMAT = 2
ADDED_ITEMS_FILE = "added_items.jsonl"  # inside an index version: names of ids after the vocabulary
LEGACY_ADDED_ITEMS_FILE = "added_items.txt"  # the same as plain lines, written by earlier versions (read only)
ENCODE_TMP_PREFIX = ".encode-"  # RUN_DIR/.encode-PID-*: a private directory of an encode into the run
_INDEX_VERSION = re.compile(r"v(\d{4,})")
_BEST = re.compile(r"best-e(\d{5,})\.pt")
OLD_CHECKPOINT_FIX = "written by an older pixelrec or not by pixelrec; refit the run"


@dataclass(frozen=True)
class Published:
    """What the manifest names: the files of one consistent, finished model."""

    version: int  # publication counter (each publish increments it)
    checkpoint: Path  # best model weights
    checkpoint_sha256: str
    best_epoch: int
    index_dir: Path  # the index version directory
    results_sha256: str | None  # results.json of this model (None before any test evaluation)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- paths -------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.json")
    manifest = property(lambda self: self.path / "manifest.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    index_root = property(lambda self: self.path / "index")
    results = property(lambda self: self.path / "results.json")
    added_covers = property(lambda self: self.path / "added" / "covers")

    def best_checkpoint(self, epoch: int) -> Path:
        """Where the best weights of `epoch` are kept (one file per best epoch, never rewritten)."""
        return self.checkpoints / f"best-e{epoch:05d}.pt"

    def exists(self) -> bool:
        return self.config.is_file()

    def lock(self) -> FileLock:
        """The lock every writer of this run holds (fit, index rebuilds and additions); taking it
        removes the temporary files of writers that were killed (`remove_stale_temp`)."""
        return _RunLock(self)

    def remove_stale_temp(self) -> None:
        """Delete what killed writers left: `.encode-*` and `index/.v-*.tmp` directories, and the
        temporary files of atomic writes. Called under the run's lock: no live writer owns them."""
        dirs = [*self.path.glob(f"{ENCODE_TMP_PREFIX}*"), *self.index_root.glob(".v-*.tmp")]
        files = [p for d in (self.path, self.checkpoints, self.added_covers) for p in d.glob(".*.tmp")]
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
        for path in files:
            path.unlink(missing_ok=True)
        if dirs or files:
            log(f"{self.path}: removed {len(dirs) + len(files)} temporary file(s) left by an interrupted writer "
                f"(e.g. {(dirs + files)[0].name})")

    # ---- config ------------------------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any], data: SequenceData, cache: dict[str, Any] | None = None,
                     softmax: dict[str, Any] | None = None, encoder_random_init: bool | None = None) -> None:
        """config.json; `cache` = identity of the embedding cache the item tower reads (if any);
        `softmax` = the softmax cost rule's modelled costs and choice (`build.softmax_choice`);
        `encoder_random_init` = whether the image encoder behind the item tower has random weights
        (--pretrained none; None for the id tower)."""
        write_json(self.config, {"pixelrec_version": __version__, "run_format": RUN_FORMAT,
                                 "data": data.summary(), "config": cfg, "cache": cache, "softmax": softmax,
                                 "encoder_random_init": encoder_random_init})

    def read_config(self) -> dict[str, Any]:
        """config.json, checked: the run format, its structure and every setting's type."""
        if not self.exists():
            if self.path.is_file():
                raise PixelrecError(f"{self.path}: a file, not a pixelrec run directory")
            raise PixelrecError(f"{self.path}: not a pixelrec run directory (no config.json); "
                                f"run `pixelrec fit --out {self.path}` first")
        meta = _read_json(self.config)
        if not isinstance(meta, dict):
            raise PixelrecError(f"{self.config}: damaged (not a JSON object); refit the run")
        fmt, version = meta.get("run_format"), str(meta.get("pixelrec_version", "?"))
        if fmt != RUN_FORMAT or version.split(".")[0] != __version__.split(".")[0]:
            raise PixelrecError(
                f"{self.path}: run written by pixelrec {version} (run format {fmt}); this is pixelrec "
                f"{__version__} (format {RUN_FORMAT}); refit the run with this version"
            )
        for key, kind in (("config", dict), ("data", dict)):
            if not isinstance(meta.get(key), kind):
                raise PixelrecError(f"{self.config}: damaged ({key!r} missing or not an object); refit the run")
        if not isinstance(meta["data"].get("fingerprint"), str):
            raise PixelrecError(f"{self.config}: damaged (data.fingerprint missing); refit the run")
        _load_fit_config(self.config, meta["config"])  # refuses null or mistyped settings by name
        return meta

    def fit_config(self, meta: dict[str, Any] | None = None) -> FitConfig:
        """The run's settings (from `meta` = read_config() when given, else read now)."""
        return _load_fit_config(self.config, (meta or self.read_config())["config"])

    # ---- data --------------------------------------------------------------------------------
    def write_data(self, data: SequenceData) -> None:
        for name, ids in (("items.txt", data.item_ids[1:]), ("users.txt", data.user_ids)):
            bad = first_bad_id(ids)
            if bad is not None:  # ingestion refuses these; a SequenceData built elsewhere may not have
                raise PixelrecError(f"{name}: id {shown(ids[bad[0]])} {bad[1]}")
        for name, ids in (("items.txt", data.item_ids), ("users.txt", data.user_ids)):
            with atomic_path(self.path / name) as tmp:
                tmp.write_text("".join(f"{t}\n" for t in ids), encoding="utf-8")
        with atomic_path(self.path / "sequences.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, offsets=data.offsets, items=data.items,
                     dropped=np.array([data.dropped_users, data.dropped_interactions, data.dropped_items]))

    def read_data(self) -> SequenceData:
        meta = self.read_config()
        try:
            item_ids = np.array(_read_names(self.path / "items.txt", first=PAD), dtype=object)
            user_ids = np.array(_read_names(self.path / "users.txt"), dtype=object)
            z = np.load(self.path / "sequences.npz", allow_pickle=False)
            dropped = z["dropped"]
            data = SequenceData(item_ids, user_ids, z["offsets"], z["items"], int(dropped[0]),
                                int(dropped[1]), int(dropped[2]), source=str(meta["data"].get("source", "")))
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise PixelrecError(f"{self.path}: run data is missing or damaged ({exc}); refit the run") from None
        if data.fingerprint != meta["data"]["fingerprint"]:
            raise PixelrecError(f"{self.path}: items.txt/users.txt/sequences.npz do not match config.json's "
                                f"fingerprint; refit the run")
        return data

    # ---- checkpoints & metrics ---------------------------------------------------------------
    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write a checkpoint: tensors and plain data only (dicts, lists, numbers, strings), which is all
        that `load_checkpoint` rebuilds; a full disk is an OSError naming `path`."""
        with atomic_path(path, suffix=".pt") as tmp:
            save_tensors(state, tmp, shown=path)

    def load_checkpoint(self, path: Path, device: torch.device | str = "cpu", sha256: str | None = None) -> dict[str, Any]:
        """A checkpoint file; with `sha256`, refused unless its content has that digest. Read with
        weights_only=True: a file that holds anything but tensors and plain data is refused unread (the
        manifest's digest cannot vouch for it: whoever writes a checkpoint can write its digest too)."""
        if not path.is_file():
            raise PixelrecError(f"{path}: checkpoint not found (did the run finish an epoch?)")
        if sha256 is not None and file_sha256(path) != sha256:
            raise PixelrecError(f"{path}: does not match the run's manifest (changed or damaged); "
                                f"repair the run with `pixelrec fit --resume` on its data, or refit it")
        state = load_tensors(path, device, what="checkpoint", fix=OLD_CHECKPOINT_FIX)  # never unpickles code
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise PixelrecError(f"{path}: not a pixelrec checkpoint (no model state)")
        return state

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        with atomic_path(self.metrics) as tmp:
            tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    # ---- publication -------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest as written, None when the run has never published a model."""
        if not self.manifest.is_file():
            return None
        manifest = _read_json(self.manifest)
        needed = ("version", "checkpoint", "checkpoint_sha256", "best_epoch", "index")
        if not isinstance(manifest, dict) or any(k not in manifest for k in needed):
            raise PixelrecError(f"{self.manifest}: damaged; repair the run with `pixelrec fit --resume` on its data")
        return manifest

    def published(self) -> Published:
        """The finished model the manifest names; PixelrecError (with the fix) when there is none."""
        manifest = self.read_manifest()
        if manifest is None:
            model = self.read_config()["config"].get("model", {}).get("model")  # a non-run says so first
            if model in MODEL_SPECS and not MODEL_SPECS[model].trains:  # VisRank (runs/visrank.py)
                raise PixelrecError(f"{self.path}: a --model {model} run has no item or user vectors to index or "
                                    f"serve; `pixelrec evaluate` and `pixelrec retrieve --user/--history` rank it "
                                    f"by brute force")
            raise PixelrecError(f"{self.path}: no finished model yet (training in progress or interrupted); "
                                f"finish it with `pixelrec fit --resume` and the same options")
        try:
            return Published(version=int(manifest["version"]), checkpoint=self.path / manifest["checkpoint"],
                             checkpoint_sha256=str(manifest["checkpoint_sha256"]),
                             best_epoch=int(manifest["best_epoch"]), index_dir=self.path / manifest["index"],
                             results_sha256=manifest.get("results_sha256"))
        except (TypeError, ValueError):
            raise PixelrecError(f"{self.manifest}: damaged; repair the run with `pixelrec fit --resume`") from None

    def write_index_version(self, write: Callable[[Path], None]) -> Path:
        """Call `write(directory)` on a private directory; on success it becomes index/vNNNN (returned).

        The version number follows every existing one, so a version directory, once in place, is
        never rewritten; readers holding an older manifest keep reading the version it names.
        """
        self.index_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".v-", suffix=".tmp", dir=self.index_root))
        try:
            write(tmp)
            for f in tmp.iterdir():
                fsync_path(f)
            number = max([v for v, _ in self.index_versions()], default=0) + 1
            final = self.index_root / f"v{number:04d}"
            os.rename(tmp, final)
            fsync_path(self.index_root)
            return final
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            full = disk_full_error(exc)  # faiss reports it as a RuntimeError naming the temporary file
            if full is not None:
                raise OSError(full.errno, full.strerror, str(self.index_root)) from None
            raise

    def index_versions(self) -> list[tuple[int, Path]]:
        if not self.index_root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.index_root.iterdir() if (m := _INDEX_VERSION.fullmatch(p.name))]
        return sorted(found)

    def publish(self, checkpoint: Path, best_epoch: int, index_dir: Path, results: dict | None = None,
                keep_results: bool = False) -> Published:
        """Name a finished model: its checkpoint, index version and (new or kept) test results.

        results.json is written first (stamped with the new version), the manifest last; both
        atomically. `keep_results`: the model is unchanged (a new index only), keep its results.
        """
        previous = self.read_manifest()
        version = (int(previous["version"]) if previous else 0) + 1
        results_sha = None
        if results is not None:
            write_json(self.results, {**results, "published": {
                "version": version, "checkpoint": _rel(checkpoint, self.path), "index": _rel(index_dir, self.path)}})
            results_sha = file_sha256(self.results)
        elif keep_results and previous:
            results_sha = previous.get("results_sha256")
        write_json(self.manifest, {
            "run_format": RUN_FORMAT, "pixelrec_version": __version__, "version": version,
            "checkpoint": _rel(checkpoint, self.path), "checkpoint_sha256": file_sha256(checkpoint),
            "best_epoch": int(best_epoch), "index": _rel(index_dir, self.path), "results_sha256": results_sha,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        self.remove_unused()
        return self.published()

    def read_results(self) -> dict[str, Any]:
        """results.json of the published model; refused when it belongs to another (unpublished) one."""
        published = self.published()
        if not self.results.is_file() or published.results_sha256 is None:
            raise PixelrecError(f"{self.results}: no test results for the published model; "
                                f"`pixelrec evaluate {self.path}` computes them")
        if file_sha256(self.results) != published.results_sha256:
            raise PixelrecError(f"{self.results}: does not belong to the published model (a fit was interrupted "
                                f"while publishing); finish it with `pixelrec fit --resume`, or use "
                                f"`pixelrec evaluate {self.path}`")
        return _read_json(self.results)

    def remove_unused(self, keep: tuple[Path, ...] = ()) -> None:
        """Delete index versions older than the one before the published one, and best checkpoints
        that the manifest, last.pt and `keep` do not name (the version before the published one
        stays for readers that loaded the previous manifest)."""
        manifest = self.read_manifest()
        keep_ckpt = set(keep)
        if manifest:
            keep_ckpt.add(self.path / manifest["checkpoint"])
            current = self.path / manifest["index"]
            versions = [p for _, p in self.index_versions()]
            if current in versions:
                for old in versions[: max(versions.index(current) - 1, 0)]:
                    shutil.rmtree(old, ignore_errors=True)
        best = self.last_best()
        if best is not None:
            keep_ckpt.add(best)
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                if _BEST.fullmatch(p.name) and p not in keep_ckpt:
                    p.unlink(missing_ok=True)

    def last_best(self) -> Path | None:
        """The best checkpoint that last.pt refers to (None without last.pt)."""
        if not self.last.is_file():
            return None
        try:
            state = load_tensors(self.last, "cpu", what="checkpoint")
            return self.path / state["best"]["path"]
        except (PixelrecError, OSError, KeyError, TypeError):
            return None


def refuse_output_inside(out: str | os.PathLike, run_dir: str | os.PathLike, option: str) -> None:
    """Refuse an output path inside a run directory the command reads (it could replace the run's
    own files, e.g. `retrieve --out RUN/manifest.json`), before anything is written."""
    run_real = os.path.realpath(run_dir)
    if os.path.commonpath([run_real, os.path.realpath(out)]) == run_real:
        raise PixelrecError(f"{option} {out}: inside the run directory {run_dir}, which this command reads; "
                            f"write it outside the run")


def run_cache_identity(cfg: FitConfig) -> dict | None:
    """Identity of the cache the item tower reads (recorded in config.json), None without a cache."""
    return cache_identity(cfg.items.cache) if cfg.items.uses_cache else None


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a state dict under `prefix` ("encoder." / "tower."), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PixelrecError(f"{path}: unreadable ({type(exc).__name__}: {exc})".split("\n")[0]) from None


def _read_names(path: Path, first: str | None = None) -> list[str]:
    """A vocabulary file: one name per line, each passing the id rule (`first`: what line 1 must be)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PixelrecError(f"{path}: not UTF-8 text (byte {exc.start}); the run directory is damaged") from None
    if text and not text.endswith("\n"):
        raise PixelrecError(f"{path}: the last line is not terminated (truncated?); the run directory is damaged")
    names = text.split("\n")[:-1]
    if first is not None and names and names[0] != first:
        raise PixelrecError(f"{path}: line 1 is {shown(names[0])}, not {first}; the run directory is damaged")
    start = 0 if first is None else 1
    bad = first_bad_id(names[start:])
    if bad is not None:
        row, problem = bad
        raise PixelrecError(f"{path}: line {start + row + 1}: name {shown(names[start + row])} {problem}; "
                            f"the run directory is damaged")
    return names


def _load_fit_config(path: Path, config: dict[str, Any]) -> FitConfig:
    """FitConfig from config.json's "config" object; null or mistyped settings are named."""
    try:
        cfg = FitConfig.from_dict(config)
    except (KeyError, TypeError) as exc:
        raise PixelrecError(f"{path}: damaged settings ({type(exc).__name__}: {exc}); refit the run") from None
    defaults = FitConfig(interactions="", out="")
    for section in ("items", "model", "loss", "train"):
        known = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        recorded = config.get(section)
        unknown = [k for k, v in (recorded.items() if isinstance(recorded, dict) else ())
                   if k not in known and v is not None and f"{section}.{k}" not in RETIRED_SETTINGS]
        if unknown:  # a setting of a newer pixelrec changes what the run computes: never drop it silently
            raise PixelrecError(f"{path}: setting {section}.{unknown[0]} is unknown to pixelrec {__version__} (the run "
                                f"was written by a newer version); read it with that version, or refit the run")
        have, want = getattr(cfg, section), getattr(defaults, section)
        for f in dataclasses.fields(have):
            value, default = getattr(have, f.name), getattr(want, f.name)
            if not _same_kind(value, default, f.type):
                raise PixelrecError(f"{path}: setting {section}.{f.name} is {value!r}, which is not a valid "
                                    f"value; the run directory is damaged")
    return cfg


def _same_kind(value: Any, default: Any, annotation: Any) -> bool:
    optional = "None" in str(annotation)
    if value is None:
        return optional
    if default is None:  # an optional setting that is set: take its declared type from the annotation
        text = str(annotation)
        kinds = [k for name, k in (("int", int), ("float", (int, float)), ("str", str), ("bool", bool)) if name in text]
        return any(isinstance(value, k) for k in kinds) if kinds else True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def log_published(run: RunDir, published: Published) -> None:
    log(f"{run.path}: published model of epoch {published.best_epoch} with index {published.index_dir.name}")


class _RunLock(FileLock):
    """The run's lock; acquiring it also clears what killed writers left in the run."""

    def __init__(self, run: RunDir):
        super().__init__(lock_path_for(run.path), f"the run directory {run.path}")
        self.run = run

    def acquire(self) -> "FileLock":
        super().acquire()
        self.run.remove_stale_temp()
        return self
