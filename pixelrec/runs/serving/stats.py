"""Counters and latency percentiles of a serving process (GET /stats)."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

LATENCY_WINDOW = 10_000  # most recent query requests the percentiles cover


class Stats:
    """Thread-safe counts of requests, queries and batches, and recent query latencies."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._latencies: deque[float] = deque(maxlen=window)
        self.requests = 0  # query requests answered (recommend, batch, similar)
        self.queries = 0  # queries answered (a batch request counts each of its queries)
        self.refused = 0  # query requests refused with a 4xx
        self.batches = 0  # micro-batches computed
        self.batched_queries = 0
        self.added_items = 0  # items added through POST /items by this process

    def record(self, seconds: float, queries: int) -> None:
        """An answered query request of `queries` queries that took `seconds`."""
        with self._lock:
            self.requests += 1
            self.queries += queries
            self._latencies.append(seconds * 1000.0)

    def record_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_queries += size

    def record_added(self, count: int) -> None:
        with self._lock:
            self.added_items += count

    def summary(self) -> dict:
        """Counts, uptime and p50 / p99 latency (milliseconds) of the recent query requests."""
        with self._lock:
            latencies = np.array(self._latencies, dtype=np.float64)
            p50, p99 = (np.percentile(latencies, [50, 99]).round(3).tolist() if len(latencies) else (None, None))
            return {"requests": self.requests, "queries": self.queries, "refused": self.refused,
                    "batches": self.batches,
                    "mean_batch_size": round(self.batched_queries / self.batches, 2) if self.batches else None,
                    "added_items": self.added_items, "uptime_s": round(time.monotonic() - self._started, 1),
                    "latency_ms": {"p50": p50, "p99": p99, "window": len(latencies)}}
