"""The API process: app factory, lifespan resources, the one error renderer, health, readiness, metrics server.

`create_app(settings)` builds the FastAPI app; `run_api(settings)` serves it with uvicorn. Every error leaves as
OpenAI's nested envelope with an `x-request-id` header: `APIError`s, request validation errors (400 with the
dotted `param`), unknown routes and methods, and unexpected exceptions (500, logged). What every request must pass
first (key, request rate, body size and nesting, NUL-free ids) is `middleware.py`'s.

Prometheus metrics are not on the API port: they name every project's models (drift series), so they are served
by a separate server on `FT_METRICS_HOST:FT_API_METRICS_PORT` (127.0.0.1:9100 by default; 0 = off).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_wsgi_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, text
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import metrics
from core.db import init_db, make_engine, make_loop_reader
from core.job_status import JobStatus
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import JobRow
from service.deps import Database, KeyCache, connect_redis
from service.errors import APIError, envelope
from service.limits import RateLimiter
from service.middleware import RequestContextMiddleware, RequestGuardMiddleware

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode (FT_API_WORKERS > 1)

_HTTP_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error"}


def create_app(settings: Settings) -> FastAPI:
    """The API app for `settings`: routes under `/v1`, `/health`, `/ready`.

    Args:
        settings: the process settings (database, Redis, artifact store, limits).

    Returns:
        The app; its lifespan opens the database, the artifact store and Redis and keeps them on `app.state`,
        and starts the metrics server.
    """
    app = FastAPI(title="Tuneworks", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    app.state.rate_limiter = (
        RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    )
    app.add_middleware(RequestGuardMiddleware, routes=app.router.routes)  # inside the request context
    app.add_middleware(RequestContextMiddleware, routes=app.router.routes)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    _add_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without the 422 it adds to every operation: request validation errors are 400s here,
    documented (with the other error statuses) by each router as OpenAI's error envelope."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = document
    return app.openapi_schema


def _add_routes(app: FastAPI) -> None:
    from service.routes import checkpoints, files, fine_tuning_jobs, graders, models

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ready", ready, methods=["GET"], include_in_schema=False)
    for router in (files.router, fine_tuning_jobs.router, models.router, checkpoints.router, graders.router):
        app.include_router(router, prefix="/v1")
    try:
        inference = importlib.import_module("service.routes.inference")
    except ImportError as exc:
        logger.warning("inference routes not available: %s", exc)
    else:
        paths = [getattr(route, "path", "") for route in inference.router.routes]
        app.include_router(inference.router, prefix="" if all(p.startswith("/v1/") for p in paths) else "/v1")
    from service import console

    console.install(app)  # `/console` (the web console), `/` redirects there, `GET /v1/drift`


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Every blocking call (a database session, validation) runs on one of `api_threads` threads and uses at most
    # one connection at a time, so a pool of that size never makes a thread wait for a connection.
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    app.state.engine = make_engine(settings.resolved_database_url, connections=settings.api_threads + 4)
    app.state.key_cache = KeyCache(ttl=settings.auth_cache_seconds)
    await run_in_threadpool(init_db, app.state.engine)
    app.state.database = Database(
        app.state.engine, loop_reader=make_loop_reader(settings.resolved_database_url)
    )
    app.state.store = ArtifactStore(settings.artifacts_dir)
    app.state.redis = await connect_redis(settings)
    app.state.redis_tried_at = time.monotonic()
    logger.info("api ready: database %s, redis %s", app.state.engine.url.render_as_string(), app.state.redis)
    # With several uvicorn workers, the supervisor serves every worker's metrics (see `run_api`).
    multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    metrics_server = None if multiprocess else _start_metrics_server(settings, app.state.engine)
    # What is alive now (modules, routes, models, the engine) lives as long as the process: out of the cyclic
    # collector's sight, a full collection walks only what requests made, instead of pausing every request in
    # flight for tens of milliseconds every few seconds under load (the p99 of the read endpoints).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if app.state.database.loop_reader is not None:
            app.state.database.loop_reader.dispose()
        if app.state.redis is not None:
            await app.state.redis.aclose()
        inference_client = getattr(app.state, "inference_client", None)  # made lazily by service.gateway
        if inference_client is not None:
            await inference_client.aclose()
        app.state.engine.dispose()


# --- error rendering ---------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.warning("request %s: %s", request.state.request_id, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = field_path(first.get("loc", ()))
    message = str(first.get("msg", "Invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        param, message = None, "The request body is not valid JSON."
    elif first.get("type") == "missing" and param:
        message = f"Missing required parameter: '{param}'."
    elif first.get("type") == "missing":
        message = "The request body is missing."
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    body = envelope(message, type="invalid_request_error", param=param, code="invalid_request")
    return JSONResponse(body, status_code=400)


def field_path(loc: Any) -> str | None:
    """`("body", "method", "supervised", "n_epochs")` -> `method.supervised.n_epochs`; list indexes as `[i]`."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"Unknown request URL: {request.method} {request.url.path}", 405: "Method not allowed"}
    body = envelope(
        message.get(exc.status_code, str(exc.detail)),
        type=_HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
    )
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


# --- health, readiness, metrics ----------------------------------------------------------------------------
async def health() -> dict[str, str]:
    """200 while the process is alive."""
    return {"status": "ok"}


async def ready(request: Request) -> JSONResponse:
    """200 when the database answers (files, jobs, models and completions need nothing else), else 503.

    Redis is reported, not required: without it jobs are still created (the worker's reconciler enqueues them
    later), so its outage makes the API `degraded`, not unready.
    """
    checks = {"database": await run_in_threadpool(_database_ok, request.app.state.engine)}
    checks["redis"] = await _redis_ok(request)
    if not checks["database"]:
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
    return JSONResponse({"status": "ok" if checks["redis"] else "degraded", "checks": checks})


def _database_ok(engine: Any) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception as exc:
        logger.warning("readiness: database check failed: %s", exc)
        return False


async def _redis_ok(request: Request) -> bool:
    from service.deps import get_redis

    redis = await get_redis(request)
    try:
        return redis is not None and bool(await redis.ping())
    except Exception as exc:
        logger.warning("readiness: redis check failed: %s", exc)
        return False


class _ScrapeTime(Collector):
    """The job and queue gauges, read from the database and Redis at each scrape (in the metrics server's thread),
    followed by `source`: this process's registry, or every worker's metrics in multiprocess mode."""

    def __init__(self, settings: Settings, engine: Any, source: Any = REGISTRY) -> None:
        self.engine, self.settings, self.source = engine, settings, source

    def collect(self) -> Any:
        import redis  # the synchronous client: this runs in the metrics server's thread, not the event loop

        jobs = GaugeMetricFamily("ft_jobs", metrics.JOBS_BY_STATUS._documentation, labels=["status"])
        try:
            counts = _job_counts(self.engine)
            for status in JobStatus:
                jobs.add_metric([status.value], counts.get(status.value, 0))
        except Exception as exc:
            logger.warning("metrics: job counts unavailable: %s", exc)
        depth = GaugeMetricFamily("ft_queue_depth", metrics.QUEUE_DEPTH._documentation)
        try:
            url = self.settings.resolved_redis_url
            with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
                depth.add_metric([], cast(int, client.zcard(self.settings.queue_name)))
        except Exception as exc:
            logger.warning("metrics: queue depth unavailable: %s", exc)
        yield jobs
        yield depth
        for family in self.source.collect():
            if family.name not in {"ft_jobs", "ft_queue_depth"}:  # declared for the docs; read above instead
                yield family


def _start_metrics_server(settings: Settings, engine: Any, source: Any = REGISTRY) -> Any:
    """prometheus_client's HTTP server on `metrics_host:api_metrics_port` (None when off or the port is taken:
    the API serves on without it, and says so)."""
    if not settings.api_metrics_port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ScrapeTime(settings, engine, source))
    try:
        server, _ = start_wsgi_server(
            settings.api_metrics_port, addr=settings.metrics_host, registry=registry
        )
    except OSError as exc:
        logger.error(
            "metrics: cannot listen on %s:%d (%s); /metrics is not served",
            settings.metrics_host, settings.api_metrics_port, exc,
        )  # fmt: skip
        return None
    logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.api_metrics_port)
    return server


def _job_counts(engine: Any) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.exec(select(JobRow.status, func.count()).group_by(JobRow.status)).all()  # type: ignore[call-overload]
    return {status: int(count) for status, count in rows}


# --- entry point -------------------------------------------------------------------------------------------
def _app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`api_workers > 1`): each builds its settings from `FT_*`."""
    return create_app(Settings())


def run_api(settings: Settings) -> int:
    """`tuneworks api`: create or upgrade the schema once, then serve with uvicorn. Returns the exit code.

    With `api_workers > 1` the worker processes write their metrics to files in a folder of FT_HOME
    (prometheus_client's multiprocess mode, set up before any worker imports it) and this supervising process
    serves their sum on the metrics port, so counters and histograms add up across workers.
    """
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    common: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "timeout_graceful_shutdown": 10,
    }
    if settings.api_workers <= 1:
        engine.dispose()
        uvicorn.run(create_app(settings), **common)
        return 0
    folder = settings.home_dir / "prometheus" / f"api-{settings.api_port}"
    shutil.rmtree(folder, ignore_errors=True)  # the files of an earlier run would be counted again
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)  # inherited by the worker processes uvicorn spawns
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    server = _start_metrics_server(settings, engine, source=registry)
    try:
        uvicorn.run("service.app:_app_from_env", factory=True, workers=settings.api_workers, **common)
    finally:
        if server is not None:
            server.shutdown()
        engine.dispose()
    return 0
