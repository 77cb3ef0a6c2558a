"""`pixelrec serve`: check the settings, bind the address, load the run, then run uvicorn.

Everything that can be wrong is found before the server starts: a bad setting, an address that
cannot be listened on (a port in use) and a directory that is not a finished run each stop with
one line. With one worker the socket bound here is handed to uvicorn, so no other process can take
the port in between; with several, uvicorn binds it again in its supervisor right after the check.

uvicorn runs with bounds a server facing untrusted clients needs: `--max-connections` open
connections (more get 503), request heads of at most 16 KiB (`h11_max_incomplete_event_size`; more
get 400), idle keep-alive connections closed after 5 s, and a connection that does not send a whole
request head within 10 s of connecting (or of its last answer) closed (`guards.HeaderTimeoutH11`: uvicorn
has no such timeout of its own). Bodies are bounded in `guards.BodyLimit`.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import PixelrecError
from .config import KEEP_ALIVE_S, MAX_HEADER_BYTES, ServeConfig, is_loopback

_BACKLOG = 2048


@dataclass(frozen=True)
class Started:
    """What `serve` is about to serve (or, with check_only, would serve)."""

    url: str
    items: int
    users: int
    index_version: int
    warnings: list[str] = field(default_factory=list)  # printed once at startup (ingestion turned off)


def serve(config: ServeConfig, check_only: bool = False, quiet: bool = False,
          announce: Callable[[Started], None] | None = None) -> Started:
    """Serve `config.run_dir` until interrupted; `check_only` stops after loading and binding."""
    config.check()
    sock = bind(config.host, config.port)
    try:
        host, port = sock.getsockname()[:2]
        if config.loopback and not is_loopback(host):  # ingestion is open on loopback only: be sure it is
            raise PixelrecError(f"--host {config.host}: resolves to {host}, not a loopback address; "
                                f"give 127.0.0.1 or ::1")
        from .app import create_app
        from .service import Service

        service = Service(config)
        snapshot = service.snapshot
        warning = config.ingestion_warning()
        started = Started(_url(host, port), snapshot.size, snapshot.trained.data.num_users, snapshot.version,
                          [warning] if warning else [])
        if announce is not None:
            announce(started)
        if check_only:
            return started
        if config.workers == 1:
            _run_one(create_app(config, service), sock, config, quiet)
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
    from ...runtime import describe_os_error  # imports torch: not at module level (`uvicorn_settings`)

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


def uvicorn_settings(config: ServeConfig, quiet: bool) -> dict[str, Any]:
    """The uvicorn settings of a server process (module doc). Worker processes (--workers > 1) unpickle
    them, importing `guards` for the protocol class, before they answer uvicorn's 5-second health
    check: that import, and this module's, must not load torch."""
    from .guards import HeaderTimeoutH11

    return dict(log_level="warning" if quiet else "info", access_log=False, timeout_graceful_shutdown=5,
                http=HeaderTimeoutH11, limit_concurrency=config.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def _run_one(app, sock: socket.socket, config: ServeConfig, quiet: bool) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_settings(config, quiet)))
    server.run(sockets=[sock])


def _run_workers(config: ServeConfig, quiet: bool) -> None:
    import uvicorn

    config.to_environment()
    uvicorn.run("pixelrec.runs.serving.app:app_from_environment", factory=True, host=config.host,
                port=config.port, workers=config.workers, **uvicorn_settings(config, quiet))
