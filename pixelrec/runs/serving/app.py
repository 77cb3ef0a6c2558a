"""The HTTP layer of `pixelrec serve`: a FastAPI application over one `Service`.

Endpoints (request and response models in `schemas.py`; the OpenAPI schema is served at /docs):

    POST /recommend              one query: {user_id} or {history}, k, exclude_history
    POST /recommend/batch        {queries: [...]}: many queries in one request
    GET  /items/{item_id}/similar?k=   nearest items by the run's item vectors
    POST /items                  multipart covers (+ ids): encoded through the run's item tower and added
    GET  /health, GET /stats

Every error is JSON `{"detail": "<one line>"}` with a 4xx status for bad input: 404 for an unknown
user or item, 422 for a bad k, a malformed body or an upload that is not an image, 413 for a body
over --max-upload-mb, 409 for an addition the run cannot take (an id run, another writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, File, Form, Query as QueryParam, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ... import __version__
from ...runtime import set_quiet
from .batching import MicroBatcher
from .config import ServeConfig
from .engine import Answer, Query, RecommendAnswer, ServeError, SimilarAnswer, SimilarQuery
from .schemas import (AddedItem, AddItemsResponse, BatchRequest, BatchResponse, Health, Problem, RecommendRequest,
                      RecommendResponse, SimilarResponse, StatsResponse)
from .service import Service
from .uploads import pair_covers

logger = logging.getLogger("pixelrec.serve")
_ERRORS = {status: {"model": Problem} for status in (404, 409, 413, 422)}


def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    """The application serving `config.run_dir` (loaded now unless `service` is given).

    Progress bars are switched off for the process: a server answers many small searches.
    """
    set_quiet(True)
    service = service or Service(config.check())
    executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="pixelrec-query")
    batcher = None
    if config.batch_window_ms > 0:
        batcher = MicroBatcher(service.answer, executor, config.batch_window_ms / 1000.0, config.max_batch,
                               on_batch=service.stats.record_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower = asyncio.create_task(_follow_manifest(service, config.poll_s)) if config.poll_s > 0 else None
        try:
            yield
        finally:
            if follower is not None:
                follower.cancel()
            if batcher is not None:
                await batcher.close()
            executor.shutdown(wait=False)

    app = FastAPI(title="pixelrec", version=__version__, lifespan=lifespan,
                  description=f"Recommendations from the trained run {config.run_dir}.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    _add_error_handlers(app)

    async def run_queries(queries: Sequence[Query], batch: bool = False) -> list[Answer]:
        started = time.perf_counter()
        if batcher is not None:
            results = await batcher.submit(queries)
        else:
            results = await asyncio.get_running_loop().run_in_executor(executor, service.answer, queries)
        for position, result in enumerate(results):
            if isinstance(result, ServeError):
                service.stats.record_refused()
                raise result.at(position) if batch else result
        service.stats.record(time.perf_counter() - started, len(queries))
        return results  # type: ignore[return-value]

    @app.post("/recommend", response_model=RecommendResponse, responses=_ERRORS, tags=["queries"])
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        """Top-k items for a user of the run or an ad-hoc history: the answer of `pixelrec retrieve`."""
        [answer] = await run_queries([body.query()])
        assert isinstance(answer, RecommendAnswer)
        return RecommendResponse.of(answer)

    @app.post("/recommend/batch", response_model=BatchResponse, responses=_ERRORS, tags=["queries"])
    async def recommend_batch(body: BatchRequest) -> BatchResponse:
        """Many queries in one request, answered together from one snapshot; any bad query refuses
        the whole request, naming its position."""
        answers = await run_queries([q.query() for q in body.queries], batch=True)
        return BatchResponse(results=[RecommendResponse.of(a) for a in answers if isinstance(a, RecommendAnswer)])

    @app.get("/items/{item_id:path}/similar", response_model=SimilarResponse, responses=_ERRORS, tags=["queries"])
    async def similar(item_id: str, k: int = QueryParam(10, description="How many items to return.",
                                                         json_schema_extra={"minimum": 1})) -> SimilarResponse:
        """The k items nearest to `item_id` by the run's item vectors (items added at run time included)."""
        [answer] = await run_queries([SimilarQuery(item_id, k)])
        assert isinstance(answer, SimilarAnswer)
        return SimilarResponse.of(answer)

    @app.post("/items", response_model=AddItemsResponse, status_code=201, responses=_ERRORS, tags=["items"])
    async def add_items(response: Response,
                        covers: list[UploadFile] = File(description="Cover images (JPEG, PNG or any format "
                                                                    "Pillow reads), one per new item."),
                        ids: list[str] | None = Form(None, description="The item id of each cover, in order; "
                                                                       "default: each file's name without "
                                                                       "its extension.")) -> AddItemsResponse:
        """Encode new covers through the run's item tower and add them to its index, persistently
        (a new published index version); searchable as soon as this returns. Ids the run already
        has are skipped."""
        files = [(c.filename or f"cover {n}", await c.read()) for n, c in enumerate(covers)]
        addition = await run_in_threadpool(service.add_covers, pair_covers(files, ids))
        snapshot = addition.snapshot
        if not addition.added:
            response.status_code = 200
        return AddItemsResponse(added=[AddedItem(item_id=i, index_id=n) for i, n in addition.added.items()],
                                skipped=addition.skipped, failed=addition.failed, items=snapshot.size,
                                index_version=snapshot.version)

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Liveness, and what is being served."""
        snapshot = service.snapshot
        return Health(status="ok", run_dir=config.run_dir, items=snapshot.size, index_version=snapshot.version,
                      image_tower=snapshot.has_image_tower)

    @app.get("/stats", response_model=StatsResponse, tags=["service"])
    async def stats() -> StatsResponse:
        """Item count, queries served and p50 / p99 latency of this server process."""
        snapshot = service.snapshot
        return StatsResponse(items=snapshot.size, users=snapshot.trained.data.num_users,
                             index_version=snapshot.version, batch_window_ms=config.batch_window_ms,
                             **service.stats.summary())

    return app


def app_from_environment() -> FastAPI:
    """The application of a worker process started by uvicorn (`--workers` > 1)."""
    return create_app(ServeConfig.from_environment())


async def _follow_manifest(service: Service, every_s: float) -> None:
    """Swap in what other processes publish (another worker's additions, `pixelrec index`)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(service.refresh)
        except Exception as error:  # noqa: BLE001 - keep serving the current snapshot, say why once per try
            logger.warning("pixelrec serve: keeping index version %s: %s", service.snapshot.version,
                           " ".join(str(error).split()))


# ------------------------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def refused(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(error.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(error.detail).split())}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))


def describe_validation(errors: Sequence[dict]) -> str:
    """One line for pydantic's validation errors of a request."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return f"malformed JSON body: {reason} at character {first['loc'][-1]}"
    parts = [f"{_where(e.get('loc', ()))}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}"
             for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return " ".join(("; ".join(parts) + more).split())


def _where(loc: Sequence) -> str:
    """("body", "queries", 3, "k") -> "queries[3].k"; the source ("body", "query", "path") is left out."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, before it is read when
    its Content-Length says so, otherwise as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": self._message()}, status_code=413, headers={"Connection": "close"})

    def _message(self) -> str:
        return f"request body over the {self.max_bytes / 1e6:g} MB limit (pixelrec serve --max-upload-mb)"
