"""The settings of `pixelrec serve`, checked before anything is loaded or bound."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from ...errors import PixelrecError

CONFIG_ENV = "PIXELREC_SERVE_CONFIG"  # how worker processes (--workers > 1) receive the settings
MAX_WINDOW_MS = 1000.0
MAX_QUERIES_PER_REQUEST = 1000  # queries in one POST /recommend/batch


@dataclass
class ServeConfig:
    """Where and how a run is served (the options of `pixelrec serve`)."""

    run_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    workers: int = 1  # server processes; each loads the run
    batch_window_ms: float = 2.0  # gather concurrent queries this long into one batch; 0 = off
    max_batch: int = 256  # most queries in one micro-batch
    max_upload_mb: float = 20.0  # largest request body (a POST /items upload), in MB
    poll_s: float = 1.0  # how often the manifest is checked for publications by other processes; 0 = never

    def check(self) -> "ServeConfig":
        """Refuse impossible settings with one line naming the option."""
        if not self.host.strip():
            raise PixelrecError("--host: empty; give an address to listen on, e.g. 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise PixelrecError(f"--port {self.port}: expected 0..65535 (0 = any free port)")
        if self.workers < 1:
            raise PixelrecError(f"--workers {self.workers}: expected at least 1")
        _in_range("--batch-window-ms", self.batch_window_ms, 0.0, MAX_WINDOW_MS)
        if self.max_batch < 1:
            raise PixelrecError(f"--max-batch {self.max_batch}: expected at least 1")
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0):
            raise PixelrecError(f"--max-upload-mb {self.max_upload_mb}: expected a positive number of megabytes")
        _in_range("poll_s", self.poll_s, 0.0, 3600.0)
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    def to_environment(self) -> None:
        """Hand the settings to worker processes started by uvicorn (they inherit the environment)."""
        os.environ[CONFIG_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_environment(cls) -> "ServeConfig":
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise PixelrecError(f"{CONFIG_ENV} is not set: start the server with `pixelrec serve RUN_DIR`")
        return cls(**json.loads(text)).check()


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise PixelrecError(f"{name} {value}: expected a number from {low:g} to {high:g}")
