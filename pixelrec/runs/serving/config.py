"""The settings of `pixelrec serve`, checked before anything is loaded or bound."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import PixelrecError

CONFIG_ENV = "PIXELREC_SERVE_CONFIG"  # how worker processes (--workers > 1) receive the settings
MAX_WINDOW_MS = 1000.0
MAX_QUERIES_PER_REQUEST = 1000  # queries in one POST /recommend/batch
HEADER_TIMEOUT_S = 10.0  # a connection must send a whole request head this soon (after connecting or its last answer)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long
MAX_HEADER_BYTES = 16 * 1024  # a request head (request line and headers) larger than this gets 400
MIN_KEY_CHARS = 16  # shortest API key accepted
MAX_KEY_FILE_BYTES = 4096
_NEW_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE"


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
    read_only: bool = False  # refuse every mutating request (POST /items) with 403
    api_key_file: str | None = None  # a file holding the token that mutating requests must carry
    max_upload_files: int = 64  # most covers in one POST /items
    max_connections: int = 1024  # open connections (and requests in progress) before new ones get 503
    body_timeout_s: float = 120.0  # a request body must arrive within this many seconds (else 408)
    images: str | None = None  # the training covers (dir or LMDB) when the run records none (an id run), or elsewhere

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
        if self.max_upload_files < 1:
            raise PixelrecError(f"--max-upload-files {self.max_upload_files}: expected at least 1")
        if self.max_connections < 1:
            raise PixelrecError(f"--max-connections {self.max_connections}: expected at least 1")
        _in_range("--body-timeout-s", self.body_timeout_s, 0.1, 3600.0)
        if self.images is not None and not os.path.exists(self.images):
            raise PixelrecError(f"--images {self.images}: not found (expected a directory of <item_id>.jpg covers "
                                f"or an LMDB image store)")
        if self.api_key_file is not None:
            read_api_key(self.api_key_file)  # refuses a missing, empty or unprotected key file
        return self

    @property
    def loopback(self) -> bool:
        """Whether the server listens on loopback only (127.0.0.0/8, ::1, localhost)."""
        return is_loopback(self.host)

    @property
    def ingestion(self) -> str:
        """What POST /items takes: "open" (loopback, no key), "api-key" (requests carrying the key) or
        "off" (--read-only, or beyond loopback without --api-key)."""
        if self.read_only:
            return "off"
        if self.api_key_file is not None:
            return "api-key"
        return "open" if self.loopback else "off"

    def ingestion_warning(self) -> str | None:
        """The warning printed at startup when ingestion is off only because no key was given."""
        if self.read_only or self.api_key_file is not None or self.loopback:
            return None
        return (f"warning: --host {self.host} listens beyond loopback, so POST /items (adding items) is off; "
                f"give --api-key FILE to enable it for requests that carry the key")

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


def read_api_key(path: str) -> str:
    """The token in the --api-key file, or one line saying why the file cannot hold one: missing,
    not a regular file, readable or writable by other users, empty, too short, or not one word."""
    where = f"--api-key {path}"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise PixelrecError(f"{where}: not a regular file; put the token in a file ({_NEW_KEY})")
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise PixelrecError(f"{where}: other users can read or change it (mode {stat.S_IMODE(st.st_mode):o}); "
                                f"restrict it with chmod 600 {path}")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise PixelrecError(f"{where}: {st.st_size} bytes; expected one token (at most {MAX_KEY_FILE_BYTES} bytes)")
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PixelrecError(f"{where}: no such file; create one with {_NEW_KEY}") from None
    except UnicodeDecodeError:
        raise PixelrecError(f"{where}: not UTF-8 text; expected one token") from None
    except OSError as error:
        raise PixelrecError(f"{where}: cannot read it ({error.strerror})") from None
    token = text.strip()
    if not token:
        raise PixelrecError(f"{where}: empty; put a token in it ({_NEW_KEY})")
    if len(token) < MIN_KEY_CHARS or not all(c.isascii() and c.isprintable() and not c.isspace() for c in token):
        raise PixelrecError(f"{where}: expected one token of at least {MIN_KEY_CHARS} printable ASCII characters "
                            f"without spaces ({_NEW_KEY})")
    return token


def is_loopback(host: str, subdomains: bool = False) -> bool:
    """127.0.0.0/8, ::1 and localhost (`subdomains`: names under .localhost too, which browsers keep on
    loopback; a system resolver need not, so a --host is not taken for loopback by such a name)."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or (subdomains and name.endswith(".localhost")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise PixelrecError(f"{name} {value}: expected a number from {low:g} to {high:g}")
