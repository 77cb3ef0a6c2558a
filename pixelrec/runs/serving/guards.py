"""Who may change a served run, and how much a request may cost: ASGI middleware in front of the app.

`RequestGuard` (outermost) answers before any body is read:
- a server listening on loopback only answers requests whose Host header is a loopback name
  (localhost, *.localhost, 127.x.x.x, ::1), so a web page that rebinds its DNS name to 127.0.0.1
  reads and writes nothing;
- a mutating request (anything but GET, HEAD, OPTIONS and the query POSTs) is refused with 403 when
  ingestion is off (--read-only, or beyond loopback without --api-key), with 403 when it carries
  an Origin other than the server's own (a browser page of another site), and with 401 when an
  --api-key is set and the request does not carry it (`Authorization: Bearer <token>` or
  `X-API-Key: <token>`, compared in constant time).
`BodyLimit` refuses a body over --max-upload-mb with 413 and one that takes longer than
--body-timeout-s to arrive with 408. `HeaderTimeoutH11` (the connection itself) closes a connection
that does not send a whole request head in time.
"""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

import h11
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import HEADER_TIMEOUT_S, ServeConfig, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
QUERY_POSTS = frozenset({"/recommend", "/recommend/batch"})  # POSTs that only read


def _refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An answer given without reading the body: the connection is closed after it."""
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})})


class RequestGuard:
    """ASGI middleware: the Host, Origin, read-only and API-key checks of the module doc."""

    def __init__(self, app, config: ServeConfig, api_key: str | None):
        self.app = app
        self.config = config
        self.api_key = None if api_key is None else api_key.encode("ascii")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> JSONResponse | None:
        headers = _headers(scope)
        host = headers.get("host")
        if self.config.loopback and host is not None and not _loopback_host(host):
            return _refusal(403, f"Host {host!r} is not a name of this server, which listens on loopback only "
                                 f"(--host {self.config.host}); address it as 127.0.0.1 or localhost")
        if scope["method"] in SAFE_METHODS or scope["path"] in QUERY_POSTS:
            return None
        what = f"{scope['method']} {scope['path']}"
        if self.config.ingestion == "off":
            why = ("the server is read-only (--read-only)" if self.config.read_only else
                   f"adding items is off beyond loopback (--host {self.config.host}) without --api-key")
            return _refusal(403, f"{what} refused: {why}")
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, host):
            return _refusal(403, f"{what} refused: a request from another site (Origin {origin!r}, this server is "
                                 f"{host!r}); browser pages of other sites may not change the run")
        if self.api_key is not None and not self._carries_key(headers):
            said = "a wrong" if _presented_key(headers) is not None else "no"
            return _refusal(401, f"{what} refused: {said} API key; send the token of --api-key as "
                                 f"'Authorization: Bearer TOKEN' or 'X-API-Key: TOKEN'",
                            {"WWW-Authenticate": "Bearer"})
        return None

    def _carries_key(self, headers: dict[str, str]) -> bool:
        presented = _presented_key(headers)
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self.api_key)


def _headers(scope) -> dict[str, str]:
    """Header name -> value (latin-1, as HTTP carries them); a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or []:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _presented_key(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def _loopback_host(host: str) -> bool:
    """Whether a Host header names loopback (a server on loopback is only ever reached by such names;
    its --host is one of them)."""
    try:
        name = urlsplit(f"//{host.strip()}").hostname
    except ValueError:
        return False
    return bool(name) and is_loopback(name, subdomains=True)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin (scheme://host[:port]) names the host:port the request was sent to."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin.strip())
        netloc = parts.netloc.lower()
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not netloc:
        return False  # "null" (sandboxed frames, file:// pages) and anything else
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    return netloc.removesuffix(default) == host.strip().lower().removesuffix(default)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, before it is read when
    its Content-Length says so, otherwise as soon as the bytes received pass the limit; a body
    still incomplete `timeout_s` after the request arrived is refused with 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _refusal(413, self._too_large())(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        complete = False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # the body is in: what follows is the client leaving, waited for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s (pixelrec serve "
                                         f"--body-timeout-s)", headers={"Connection": "close"}) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._too_large(), headers={"Connection": "close"})
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> str:
        return f"request body over the {self.max_bytes / 1e6:g} MB limit (pixelrec serve --max-upload-mb)"


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    HEADER_TIMEOUT_S of connecting or of its previous answer (a client trickling header bytes
    would otherwise hold its connection, and a --max-connections slot, for ever)."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request under way: nothing to answer
