"""Micro-batching: queries of concurrent requests gathered for a few milliseconds and answered as
one batch (one user-tower forward, one FAISS search per distinct k), one batch at a time.

A request's queries stay together in one batch. The window starts when the oldest waiting request
arrived, so requests that queued while the previous batch was computed do not wait a second time;
a batch is closed early when `max_batch` queries are waiting. A request whose client went away is
still computed with its batch, and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[Q, R]):
    queries: Sequence[Q]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Q, R]):
    """Gathers `submit`ted queries and runs `compute(queries) -> results` on them in `executor`."""

    def __init__(self, compute: Callable[[list[Q]], list[R]], executor: Executor, window_s: float,
                 max_batch: int, on_batch: Callable[[int], None] | None = None):
        self._compute = compute
        self._executor = executor
        self._window_s = window_s
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._waiting: deque[_Waiting[Q, R]] = deque()
        self._queued = 0  # queries waiting
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._arrival: asyncio.Event | None = None
        self._full: asyncio.Event | None = None

    async def submit(self, queries: Sequence[Q]) -> list[R]:
        """The results of `queries`, computed in a batch with other requests' queries."""
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(queries, future))
        self._queued += len(queries)
        self._arrival.set()
        if self._queued >= self._max_batch:
            self._full.set()
        return await future

    async def close(self) -> None:
        """Stop gathering; requests still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(RuntimeError("the server is shutting down"))

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        self._loop = loop
        self._arrival, self._full = asyncio.Event(), asyncio.Event()
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._arrival.wait()
            await self._gather()
            batch = self._take()
            if not self._waiting:
                self._arrival.clear()
            if self._queued < self._max_batch:
                self._full.clear()
            if batch:
                await self._answer(batch)

    async def _gather(self) -> None:
        """Wait until the oldest request has waited the window, or a full batch is waiting."""
        remaining = self._waiting[0].arrived + self._window_s - time.monotonic() if self._waiting else 0.0
        if remaining > 0 and self._queued < self._max_batch:
            try:
                await asyncio.wait_for(self._full.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _take(self) -> list[_Waiting[Q, R]]:
        """Waiting requests up to max_batch queries (at least one request, however large)."""
        batch: list[_Waiting[Q, R]] = []
        size = 0
        while self._waiting and (not batch or size + len(self._waiting[0].queries) <= self._max_batch):
            waiting = self._waiting.popleft()
            batch.append(waiting)
            size += len(waiting.queries)
        self._queued -= size
        return batch

    async def _answer(self, batch: list[_Waiting[Q, R]]) -> None:
        queries = [q for waiting in batch for q in waiting.queries]
        if self._on_batch is not None:
            self._on_batch(len(queries))
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._compute, queries)
        except Exception as error:  # a bug in compute: every request of the batch reports it
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        start = 0
        for waiting in batch:
            stop = start + len(waiting.queries)
            if not waiting.future.done():  # cancelled when its client went away
                waiting.future.set_result(results[start:stop])
            start = stop
