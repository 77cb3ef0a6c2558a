"""The HTTP layer of `pixelrec serve`: a FastAPI application over one `Service`.

Endpoints (request and response models in `schemas.py`; the OpenAPI schema is served at /docs):

    POST /recommend              one query: {user_id} or {history}, k, exclude_history
    POST /recommend/batch        {queries: [...]}: many queries in one request
    GET  /items/{item_id}/similar?k=&metric=   nearest items by cosine (default) or inner product
    GET  /items/{item_id}/cover?size=          the item's cover as JPEG (a thumbnail with size)
    POST /items                  multipart covers (+ ids): encoded through the run's item tower and added
    GET  /health, GET /stats, GET /run (the run's summary: model, tower, encoder, test metrics)
    GET  /                       the browsing page (static/: one HTML page, a script and a style sheet)
    GET  /docs, /redoc           API docs, their assets served from the fastapi-offline package

Every error is JSON `{"detail": "<one line>"}` with a 4xx status for bad input: 404 for an unknown
user or item, 422 for a bad k, a malformed or wrongly typed body or an upload that is not an image
(or is above the pixel cap), 413 for a body over --max-upload-mb or more covers than
--max-upload-files, 408 for a body slower than --body-timeout-s, 409 for an addition the run cannot
take (an id run, another writer); 401 / 403 for a mutating request that `guards.py` refuses; 507
when the disk fills up during an addition (nothing is added).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, File, Form, Query as QueryParam, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ... import __version__
from ...errors import PixelrecError
from ...runtime import set_quiet
from .batching import MicroBatcher
from .config import ServeConfig, read_api_key
from .covers import MAX_SIZE, MIN_SIZE
from .engine import Answer, Query, RecommendAnswer, ServeError, SimilarAnswer, SimilarQuery
from .guards import BodyLimit, RequestGuard
from .schemas import (AddedItem, AddItemsResponse, BatchRequest, BatchResponse, Health, Problem, RecommendRequest,
                      RecommendResponse, RunSummary, SimilarResponse, StatsResponse)
from .service import Service
from .snapshot import Snapshot
from .uploads import pair_covers

logger = logging.getLogger("pixelrec.serve")
_ERRORS = {status: {"model": Problem} for status in (404, 409, 413, 422)}
_WRITE_ERRORS = {status: {"model": Problem} for status in (401, 403, 408, 409, 413, 422, 507)}
_TOO_MANY_PARTS = ("Too many files", "Too many fields")  # Starlette's multipart limits (1000 each), 400
STATIC_DIR = Path(__file__).with_name("static")
_COVER_CACHE = "public, max-age=300"


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

    app = FastAPI(title="pixelrec", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Recommendations from the trained run {config.run_dir}.")
    app.state.service = service
    covers = service.covers
    _add_pages(app)
    app.state.max_upload_files = config.max_upload_files
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    api_key = read_api_key(config.api_key_file) if config.api_key_file is not None else None
    app.add_middleware(RequestGuard, config=config, api_key=api_key)  # outermost: before any body is read
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
                                                         json_schema_extra={"minimum": 1}),
                      metric: str = QueryParam("cosine", description='"cosine" (exact scan over unit-length '
                                                                     'vectors) or "ip" (the run\'s index, by '
                                                                     'inner product).')) -> SimilarResponse:
        """The k items nearest to `item_id` by the run's item vectors (items added at run time included),
        by cosine by default: an exact copy of a cover finds its original first."""
        [answer] = await run_queries([SimilarQuery(item_id, k, metric)])
        assert isinstance(answer, SimilarAnswer)
        return SimilarResponse.of(answer)

    @app.get("/items/{item_id:path}/cover", response_class=Response, tags=["items"],
             responses={200: {"content": {"image/jpeg": {}}, "description": "The cover, JPEG."}, **_ERRORS})
    async def cover(request: Request, item_id: str,
                    size: int | None = QueryParam(None, description=f"Scale to at most this many pixels a side "
                                                                    f"({MIN_SIZE} to {MAX_SIZE}); default: "
                                                                    f"the cover's own size.")) -> Response:
        """The item's cover from the run's cover store (training covers: `serve --images` or what the
        run records; added items: RUN_DIR/added/covers), as JPEG with an ETag; 404 when it has none."""
        rendered = await run_in_threadpool(covers.cover, service.snapshot, item_id, size)
        headers = {"ETag": rendered.etag, "Cache-Control": _COVER_CACHE}
        if rendered.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(rendered.data, media_type=rendered.media_type, headers=headers)

    @app.get("/run", response_model=RunSummary, tags=["service"])
    async def run() -> RunSummary:
        """The run being served: model, item tower, encoder, test metrics, where its covers are, and
        whether this server takes uploads (what the browsing page shows)."""
        return await run_in_threadpool(run_summary, service.snapshot, config, covers.describe())

    @app.post("/items", response_model=AddItemsResponse, status_code=201, responses=_WRITE_ERRORS, tags=["items"])
    async def add_items(response: Response,
                        covers: list[UploadFile] = File(description="Cover images (JPEG, PNG or any format "
                                                                    "Pillow reads), one per new item."),
                        ids: list[str] | None = Form(None, description="The item id of each cover, in order; "
                                                                       "default: each file's name without "
                                                                       "its extension.")) -> AddItemsResponse:
        """Encode new covers through the run's item tower and add them to its index, persistently
        (a new published index version); searchable as soon as this returns. Ids the run already
        has are skipped. Needs the --api-key token when the server has one; off with --read-only."""
        if len(covers) > config.max_upload_files:
            raise ServeError(413, _too_many_covers(len(covers), config.max_upload_files))
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
                      image_tower=snapshot.has_image_tower, ingestion=config.ingestion)

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


# -------------------------------------------------------------------------------------- pages
def docs_assets() -> Path:
    """The Swagger UI and ReDoc files shipped by the fastapi-offline package (no CDN)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).with_name("static")


def _add_pages(app: FastAPI) -> None:
    """The browsing page at /, its files under /static, and /docs and /redoc with local assets."""
    app.mount("/static/docs", StaticFiles(directory=docs_assets()), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pixelrec API",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/static/docs/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="pixelrec API",
                              redoc_js_url="/static/docs/redoc.standalone.js",
                              redoc_favicon_url="/static/docs/favicon.png", with_google_fonts=False)


def run_summary(snapshot: Snapshot, config: ServeConfig, covers: str) -> RunSummary:
    """What GET /run answers: the served run's settings, its test metrics and this server's ingestion."""
    trained = snapshot.trained
    cfg = trained.cfg
    meta = trained.run.read_config()
    encoder = None
    if cfg.items.kind == "e2e":
        encoder = cfg.items.encoder
    elif isinstance(meta.get("cache"), dict):
        encoder = meta["cache"].get("model")
    try:
        test = {k: v for k, v in trained.run.read_results().items() if k != "published"}
    except PixelrecError:
        test = None
    return RunSummary(run_dir=config.run_dir, model=cfg.model.model, tower=cfg.items.kind, encoder=encoder,
                      dim=cfg.model.dim, max_len=cfg.model.max_len, users=trained.data.num_users,
                      items=snapshot.size, trained_items=trained.data.num_items, index_version=snapshot.version,
                      best_epoch=snapshot.published.best_epoch, test=test, covers=covers,
                      image_tower=snapshot.has_image_tower, ingestion=config.ingestion)


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
        detail, status = " ".join(str(error.detail).split()), error.status_code
        if status == 400 and detail.startswith(_TOO_MANY_PARTS):
            detail, status = _too_many_covers(None, app.state.max_upload_files), 413
        elif status == 400:  # the multipart parser's: a malformed body is 422 like a malformed JSON body
            detail, status = f"malformed request body: {detail}", 422
        return JSONResponse({"detail": detail}, status_code=status, headers=getattr(error, "headers", None))


def _too_many_covers(given: int | None, limit: int) -> str:
    what = f"{given} covers" if given is not None else "too many covers or fields"
    return f"{what} in one request; at most {limit} covers (pixelrec serve --max-upload-files): send several requests"


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
