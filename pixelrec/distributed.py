"""torch.distributed for pixelrec: one process per rank under `torchrun`, a plain process otherwise.

`torchrun ... -m pixelrec COMMAND` starts one process per rank with the usual environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). `init()` joins the process group (NCCL on CUDA, gloo on
CPU) with a timeout on every collective, so a lost peer ends the job instead of hanging it; with a
world size of 1 it does nothing and every helper below is a no-op. A `World` is what a command
needs to know: its rank, how many there are, which share of the work is its own, and a few
collectives written for pixelrec's needs (agreeing on settings, sharing one rank's result or
failure, gathering per-rank pieces in rank order).

Failures: a command step that only rank 0 runs (`World.on_main`) or that every rank runs
(`World.agree`) reports a PixelrecError on any rank to every rank, so all of them stop together;
rank 0 prints the one-line error and the others stay quiet (`PeerFailed`). A rank that dies (killed,
out of memory, machine lost) cannot report anything: the survivors' next collective fails with the
backend's connection error, which `lost_peer_line` words as "rank N stopped; <how to rerun>". N is
found from the ranks' (host, pid) exchanged at `init`: a rank on this host whose process is gone
(or a zombie) is one that stopped; with two ranks the peer is the only candidate.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import PixelrecError
from .runtime import resolve_device, set_quiet

TIMEOUT_ENV = "PIXELREC_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")
# words of gloo's / NCCL's / c10d's errors when a peer's connection went away or a collective timed out
_LOST_PEER_WORDS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                    "timed out", "Timed out", "Timeout", "NCCL communicator was aborted", "remote process exited",
                    "Socket Timeout", "recvValue failed", "sendBytes failed", "recvBytes failed")
_job: dict[str, Any] = {"peers": [], "rerun": "rerun the same command", "lost": False}


class PeerFailed(PixelrecError):
    """Another rank failed (it, or rank 0, reports why); this rank stops quietly."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    # ---- shares of the work ----------------------------------------------------------------------
    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n things (rank order = the things' order)."""
        return self.span_of(n, self.rank)

    def span_of(self, n: int, rank: int) -> tuple[int, int]:
        """Rank `rank`'s contiguous share [lo, hi) of n things."""
        return n * rank // self.size, n * (rank + 1) // self.size

    def share(self, items: Sequence[T]) -> Sequence[T]:
        lo, hi = self.span(len(items))
        return items[lo:hi]

    # ---- collectives -----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (a new tensor; the input is left as it was)."""
        if not self.is_distributed:
            return tensor.clone()
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather_with_grad(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape on every rank), in rank order, differentiable: the gradient of
        each part, summed over the ranks that used it, flows back to the rank that computed it."""
        if not self.is_distributed:
            return [x]
        return list(_GatherWithGrad.apply(x, self.rank, self.size).unbind(0))

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and give its result to every rank (it must be picklable). If it fails,
        rank 0 re-raises and the other ranks raise PeerFailed, so no rank waits for a dead one."""
        if not self.is_distributed:
            return fn()
        failure: BaseException | None = None
        payload: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                payload = (True, fn())
            except BaseException as exc:  # noqa: BLE001 - passed on to the other ranks, then re-raised
                failure, payload = exc, (False, _describe(exc))
        ok, value = self.broadcast(payload)
        if failure is not None:
            raise failure
        if not ok:
            raise PeerFailed(f"rank 0 failed: {value}")
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails on any, every rank raises: the failing rank its own
        error, rank 0 a PixelrecError naming the failed rank, the others PeerFailed."""
        if not self.is_distributed:
            return fn()
        failure: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to every rank below
            failure = exc
        reports = self.gather(None if failure is None else _describe(failure))
        if failure is not None:
            raise failure
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            rank, message = failed[0]
            if self.is_main:
                raise PixelrecError(f"rank {rank}: {message}")
            raise PeerFailed(f"rank {rank} failed: {message}")
        return result

    def check_same(self, what: str, value: Any) -> None:
        """Refuse to go on when the ranks were given different `value`s (e.g. settings)."""
        if not self.is_distributed:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.gather(digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise PixelrecError(f"the ranks were started with different {what}: rank {odd[0]} differs from rank 0; "
                                f"give every rank the same command line")

    # ---- devices ---------------------------------------------------------------------------------
    def device(self, requested: str = "auto") -> torch.device:
        """The device of this rank: with CUDA, GPU `local_rank` of this node (one GPU per rank)."""
        device = resolve_device(requested)
        if device.type != "cuda" or not self.is_distributed:
            return device
        visible = torch.cuda.device_count()
        if self.local_size > visible:
            raise PixelrecError(f"--device {requested}: {self.local_size} ranks on this node but only {visible} "
                                f"visible GPU(s); start at most {visible} processes per node (--nproc-per-node)")
        return torch.device("cuda", self.local_rank)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: every rank's gradient of every part summed (all_reduce), each rank
    keeping its own part (gloo has no reduce_scatter, so this works on every backend)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = rank
        return torch.stack(parts)  # [size, *x.shape]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def env_world() -> World:
    """The World torchrun's environment describes (rank 0 of 1 without it), without joining anything."""
    def read(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise PixelrecError(f"{name}={os.environ.get(name)!r}: expected an integer (set by torchrun)") from None

    size = read("WORLD_SIZE", 1)
    rank, local_rank = read("RANK", 0), read("LOCAL_RANK", 0)
    local_size = read("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size:
        raise PixelrecError(f"RANK={rank} and WORLD_SIZE={size} do not describe a rank of a job")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)


def init(device: str = "auto", rerun: str = "rerun the same command") -> World:
    """Join the job's process group (once per process) and return this rank's World.

    NCCL when this rank's device is a GPU, gloo on CPU; collectives time out after
    PIXELREC_DIST_TIMEOUT seconds (default 1800). A world of one joins nothing. `rerun`: how to
    continue after a lost rank (the end of the line `lost_peer_line` gives).
    """
    _job["rerun"] = rerun
    world = env_world()
    if not world.is_distributed or dist.is_initialized():
        return world
    if not world.is_main:
        set_quiet(True)  # rank 0 alone shows progress and status lines
    if not dist.is_available():
        raise PixelrecError("this torch build has no torch.distributed; run without torchrun or install a torch "
                            "build with distributed support")
    target = world.device(device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise PixelrecError(f"torch.distributed backend {backend} is not available in this torch build "
                            f"({'GPU' if backend == 'nccl' else 'CPU'} ranks need it)")
    if target.type == "cuda":
        torch.cuda.set_device(target)
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise PixelrecError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r}: expected seconds") from None
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(_leave)
    _job["peers"] = world.gather((socket.gethostname(), os.getpid()))  # to name a rank that dies later
    return world


def _leave() -> None:
    """Leave the process group at exit (a process group torn down by the interpreter can abort); not
    after a lost rank, where tearing the group down can wait for the dead one."""
    if dist.is_initialized() and not _job["lost"]:
        dist.destroy_process_group()


def lost_peer_line(exc: BaseException) -> str | None:
    """'rank N stopped; <rerun>' when `exc` is a collective that failed because another rank of this
    job died or stopped answering; None for any other exception."""
    if not (dist.is_available() and dist.is_initialized()) or not _is_lost_peer(exc):
        return None
    _job["lost"] = True
    world = env_world()
    stopped = _stopped_ranks(world)
    if stopped:
        who = f"rank {stopped[0]}" if len(stopped) == 1 else f"ranks {', '.join(map(str, stopped))}"
        return f"{who} stopped; {_job['rerun']}"
    others = [r for r in range(world.size) if r != world.rank]
    if len(others) == 1:
        return f"rank {others[0]} stopped or became unreachable; {_job['rerun']}"
    return f"another rank of the job stopped or became unreachable (not one on this host); {_job['rerun']}"


def _is_lost_peer(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (RuntimeError, ConnectionError)):
            text = str(current)
            if any(words in text for words in _LOST_PEER_WORDS):
                return True
        current = current.__cause__ or current.__context__
    return False


def _stopped_ranks(world: World, wait_s: float = 1.0) -> list[int]:
    """Ranks on this host whose process is gone or a zombie (waiting up to `wait_s` for a dying one)."""
    host = socket.gethostname()
    local = [(r, int(pid)) for r, (h, pid) in enumerate(_job["peers"]) if h == host and r != world.rank]
    deadline = time.monotonic() + wait_s
    while True:
        stopped = [r for r, pid in local if not _alive(pid)]
        if stopped or time.monotonic() >= deadline:
            return stopped
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def current() -> World:
    """The World of a process that has run `init` (or a world of one)."""
    return env_world() if dist.is_available() and dist.is_initialized() else World()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, PixelrecError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

