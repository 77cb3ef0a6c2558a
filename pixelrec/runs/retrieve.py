"""`pixelrec retrieve`: top-k items for users of a run, ad-hoc histories, or a file of users.

The query is the user vector after the history's last item; the history itself is excluded from
the results. Batch retrieval streams JSONL (one object per user) and writes files atomically;
`--html` writes one standalone page with the covers instead (`retrieve_html`, `html_report.py`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, TextIO

import numpy as np

from .. import distributed
from ..errors import PixelrecError
from ..runtime import atomic_path, progress
from .rundir import refuse_output_inside
from .trained import TrainedRun, load_trained
from .visrank import VisRankRun, is_visrank_run


@dataclass
class Recommendation:
    """Top-k items for one query (a user of the run or an ad-hoc history), best first."""

    user_id: str | None
    history: list[str]  # the query's items, oldest first (all excluded from `items`)
    items: list[str]
    scores: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchRetrieval:
    """What `retrieve --users` did."""

    served: int
    unknown: list[str] = field(default_factory=list)  # user ids not in the run (reported, not fatal)
    out: str | None = None


def retrieve_one(run_dir: str, user: str | None = None, history: list[str] | None = None, k: int = 10,
                 device: str = "cpu") -> Recommendation:
    if is_visrank_run(run_dir):  # no user or item vectors: ranked by brute force (runs/visrank.py)
        return _visrank_recommendation(VisRankRun(run_dir), user, history, k)
    trained = load_trained(run_dir, device=device)
    return _recommendation(*_query(trained, user, history, k))


def _visrank_recommendation(run: "VisRankRun", user: str | None, history: list[str] | None, k: int
                            ) -> Recommendation:
    names = run.data.item_ids
    if user is not None:
        u = run.data.user_index.get(str(user))
        if u is None:
            raise PixelrecError(f"unknown user {user!r}: not among the {run.data.num_users} users of {run.run.path}")
        hist = run.data.history(u, "all")
    else:
        hist = _history_indices(names, history or [])
    ids, scores = run.query(hist, k)
    return Recommendation(user_id=user, history=[str(names[i]) for i in hist], items=[str(names[i]) for i in ids],
                          scores=[round(float(s), 6) for s in scores])


def _query(trained: TrainedRun, user: str | None, history: list[str] | None, k: int
           ) -> tuple[TrainedRun, str | None, np.ndarray, np.ndarray, np.ndarray]:
    """(trained, user, history index ids, result index ids, scores) of one query."""
    if user is not None:
        u = trained.data.user_index.get(str(user))
        if u is None:
            raise PixelrecError(f"unknown user {user!r}: not among the {trained.data.num_users} users of "
                                f"{trained.run.path}")
        hist = trained.data.history(u, "all")
    else:
        u, hist = -1, _history_indices(trained, history or [])  # not a training user: folded in by MF / VBPR
    vec = trained.model.encode_histories([hist], item_table=trained.table, users=np.array([u]))
    scores, ids = trained.index.search(vec, k, exclude=[hist])
    keep = ids[0] >= 0
    return trained, user, np.asarray(hist), ids[0][keep], scores[0][keep]


def _recommendation(trained: TrainedRun, user: str | None, hist: np.ndarray, ids: np.ndarray,
                    scores: np.ndarray) -> Recommendation:
    return Recommendation(user_id=user, history=[str(trained.item_names[i]) for i in hist],
                          items=[str(trained.item_names[i]) for i in ids],
                          scores=[round(float(s), 6) for s in scores])


def retrieve_html(run_dir: str, out: str, user: str | None = None, history: list[str] | None = None,
                  users: str | None = None, k: int = 10, images: str | None = None, device: str = "cpu") -> dict:
    """`retrieve --html`: a standalone page of one query's (or a users file's) history and top-k
    covers (`html_report`). An `out` inside the run is refused first; so are more users than one
    page shows. Returns {"queries", "unknown", "covers"}."""
    from .html_report import MAX_HTML_QUERIES, ShownItem, ShownQuery, write_html

    refuse_output_inside(out, run_dir, "--html")
    trained = load_trained(run_dir, device=device)
    unknown: list[str] = []
    if users is not None:
        wanted = read_user_ids(users, trained.data.user_ids)
        if len(wanted) > MAX_HTML_QUERIES:
            raise PixelrecError(f"--users {users}: {len(wanted)} users; one --html page shows at most "
                                f"{MAX_HTML_QUERIES} (give fewer, or use --out for JSONL)")
        unknown = [u for u in wanted if u not in trained.data.user_index]
        asked = [(u, None) for u in wanted if u in trained.data.user_index]
    else:
        asked = [(user, history)]
    counts = trained.data.train_counts
    shown = []
    for who, items in asked:
        _, _, hist, ids, scores = _query(trained, who, items, k)
        history_items = [ShownItem(str(trained.item_names[i]), int(i)) for i in hist]
        results = [ShownItem(str(trained.item_names[i]), int(i), round(float(s), 6),
                             bool(0 < i < len(counts) and counts[i] > 0)) for i, s in zip(ids, scores)]
        shown.append(ShownQuery(f"user {who}" if who is not None else "history", history_items, results))
    embedded = write_html(out, trained, shown, k, images)
    return {"queries": len(shown), "unknown": unknown, "covers": embedded}


def _history_indices(trained: TrainedRun | np.ndarray, names: list[str]) -> np.ndarray:
    """Item indices of a history given by item ids; `trained`: a run, or the item names themselves."""
    item_names = trained if isinstance(trained, np.ndarray) else trained.item_names
    lookup = {str(n): i for i, n in enumerate(item_names) if i > 0}
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise PixelrecError("the history is empty: give item ids, oldest first")
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise PixelrecError(f"unknown item id(s) in the history: {', '.join(map(repr, unknown[:10]))}"
                            f"{' ...' if len(unknown) > 10 else ''} (not in the run's vocabulary or index)")
    return np.array([lookup[n] for n in names], dtype=np.int64)


def read_lines(source: str, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file ('-' = stdin); a BOM is ignored."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(source, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise PixelrecError(f"{source}: not UTF-8 text (byte {exc.start}); expected {what}") from None
        except OSError as exc:
            raise PixelrecError(f"{source}: cannot read {what} ({exc.strerror})") from None
    return [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]


def parse_history(text: str) -> list[str]:
    """A --history value: comma-separated item ids, or a JSON list of ids (for ids holding commas)."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PixelrecError(f"--history: not a valid JSON list ({exc.msg} at character {exc.pos})") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, int)) for i in items):
            raise PixelrecError("--history: a JSON history must be a list of item id strings")
        return [str(i) for i in items]
    return text.split(",")


def read_user_ids(source: str, all_users: Iterable[str]) -> list[str]:
    """User ids from a file (one per line), '-' for stdin, or 'all'."""
    if source == "all":
        return [str(u) for u in all_users]
    ids = read_lines(source, "one user id per line")
    if not ids:
        raise PixelrecError(f"{source}: no user ids (expected one user id per line)")
    return ids


def retrieve_batch(run_dir: str, users: str, k: int = 10, out: str | None = None, device: str = "cpu",
                   batch_size: int = 1024) -> BatchRetrieval:
    """Stream JSONL {user_id, items, scores} for every known user; unknown ids are reported, not fatal.

    Under torchrun each rank answers a contiguous run of `batch_size` batches of users; rank 0
    writes the lines in the order of the users file, the same bytes as one process writes.
    An `out` inside the run directory is refused before anything is read or written.
    """
    if out is not None:
        refuse_output_inside(out, run_dir, "--out")
    world = distributed.init(device)
    trained = world.agree(lambda: load_trained(run_dir, device=world.device(device)))
    wanted = world.agree(lambda: read_user_ids(users, trained.data.user_ids)) if users != "-" else \
        world.broadcast(read_user_ids(users, trained.data.user_ids) if world.is_main else None)
    index = trained.data.user_index
    known = [u for u in wanted if u in index]
    unknown = [u for u in wanted if u not in index]
    batches = [known[i : i + batch_size] for i in range(0, len(known), batch_size)]
    if not world.is_distributed:
        _write(out, lambda f: _stream(trained, batches, index, k, f))
    else:
        lines = world.agree(lambda: _lines(trained, world.share(batches), index, k))
        parts = world.gather(lines)  # rank order = user order
        if world.is_main:
            _write(out, lambda f: f.writelines(line for part in parts for line in part))
        world.barrier()
    return BatchRetrieval(served=len(known), unknown=unknown, out=out)


def _write(out: str | None, write: Callable[[TextIO], None]) -> None:
    """Run `write` on stdout, or on `out` written atomically."""
    if out is None:
        write(sys.stdout)
        return
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)


def _stream(trained: TrainedRun, batches: list[list[str]], index: dict[str, int], k: int, f: TextIO) -> None:
    bar = progress(total=sum(map(len, batches)), desc="retrieve", unit="user")
    for chunk in batches:
        f.writelines(_lines(trained, [chunk], index, k))
        bar.update(len(chunk))
    bar.close()


def _lines(trained: TrainedRun, batches: list[list[str]], index: dict[str, int], k: int) -> list[str]:
    """The JSONL lines of the users in `batches`, each batch encoded and searched at once."""
    names, out = trained.item_names, []
    for chunk in batches:
        hists = [trained.data.history(index[u], "all") for u in chunk]
        vecs = trained.model.encode_histories(hists, item_table=trained.table, batch_size=len(chunk),
                                              users=np.array([index[u] for u in chunk]))
        scores, ids = trained.index.search(vecs, k, exclude=hists)
        for u, s_row, i_row in zip(chunk, scores, ids):
            keep = i_row >= 0
            out.append(json.dumps({"user_id": u, "items": [str(names[j]) for j in i_row[keep]],
                                   "scores": [round(float(s), 6) for s in s_row[keep]]}) + "\n")
    return out
