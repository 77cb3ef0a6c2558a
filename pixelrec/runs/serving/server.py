"""`pixelrec serve`: check the settings, bind the address, load the run, then run uvicorn.

Everything that can be wrong is found before the server starts: a bad setting, an address that
cannot be listened on (a port in use) and a directory that is not a finished run each stop with
one line. With one worker the socket bound here is handed to uvicorn, so no other process can take
the port in between; with several, uvicorn binds it again in its supervisor right after the check.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Callable

from ...errors import PixelrecError
from ...runtime import describe_os_error
from .config import ServeConfig

_BACKLOG = 2048


@dataclass(frozen=True)
class Started:
    """What `serve` is about to serve (or, with check_only, would serve)."""

    url: str
    items: int
    users: int
    index_version: int


def serve(config: ServeConfig, check_only: bool = False, quiet: bool = False,
          announce: Callable[[Started], None] | None = None) -> Started:
    """Serve `config.run_dir` until interrupted; `check_only` stops after loading and binding."""
    config.check()
    sock = bind(config.host, config.port)
    try:
        from .app import create_app
        from .service import Service

        service = Service(config)
        snapshot = service.snapshot
        host, port = sock.getsockname()[:2]
        started = Started(_url(host, port), snapshot.size, snapshot.trained.data.num_users, snapshot.version)
        if announce is not None:
            announce(started)
        if check_only:
            return started
        if config.workers == 1:
            _run_one(create_app(config, service), sock, quiet)
        else:
            del service, snapshot  # each worker loads its own copy
            sock.close()
            _run_workers(ServeConfig(**{**vars(config), "port": port}), quiet)
        return started
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or one line saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise PixelrecError(f"--host {host}: not an address this machine can listen on ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as error:
        sock.close()
        raise PixelrecError(_bind_failure(host, port, error)) from None
    return sock


def _bind_failure(host: str, port: int, error: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use by another process; choose another --port (0 = any free port)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 or one of its addresses"
    if error.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); choose a --port above 1023"
    return f"{where}: {describe_os_error(error)}"


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run_one(app, sock: socket.socket, quiet: bool) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def _run_workers(config: ServeConfig, quiet: bool) -> None:
    import uvicorn

    config.to_environment()
    uvicorn.run("pixelrec.runs.serving.app:app_from_environment", factory=True, host=config.host,
                port=config.port, workers=config.workers, log_level="warning" if quiet else "info",
                access_log=False, timeout_graceful_shutdown=5)
