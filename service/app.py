"""The API process: app factory, lifespan resources, request ids and metrics, the one error renderer.

`create_app(settings)` builds the FastAPI app; `run_api(settings)` serves it with uvicorn. Every error leaves as
OpenAI's nested envelope with an `x-request-id` header: `APIError`s, request validation errors (400 with the
dotted `param`), unknown routes and methods, and unexpected exceptions (500, logged).
"""

from __future__ import annotations

import importlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, text
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import metrics
from core.db import init_db, make_engine
from core.job_status import JobStatus
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import JobRow
from service.deps import connect_redis
from service.errors import APIError, envelope

logger = logging.getLogger(__name__)

_HTTP_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error"}


def create_app(settings: Settings) -> FastAPI:
    """The API app for `settings`: routes under `/v1`, `/health`, `/ready`, `/metrics`.

    Args:
        settings: the process settings (database, Redis, artifact store, limits).

    Returns:
        The app; its lifespan opens the database, the artifact store and Redis and keeps them on `app.state`.
    """
    app = FastAPI(title="Tuneworks", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    _add_routes(app)
    return app


def _add_routes(app: FastAPI) -> None:
    from service.routes import files, fine_tuning_jobs, models

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ready", ready, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics_text, methods=["GET"], include_in_schema=False)
    for router in (files.router, fine_tuning_jobs.router, models.router):
        app.include_router(router, prefix="/v1")
    try:
        inference = importlib.import_module("service.routes.inference")
    except ImportError as exc:
        logger.warning("inference routes not available: %s", exc)
    else:
        paths = [getattr(route, "path", "") for route in inference.router.routes]
        app.include_router(inference.router, prefix="" if all(p.startswith("/v1/") for p in paths) else "/v1")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.engine = make_engine(settings.resolved_database_url)
    await run_in_threadpool(init_db, app.state.engine)
    app.state.store = ArtifactStore(settings.artifacts_dir)
    app.state.redis = await connect_redis(settings)
    app.state.redis_tried_at = time.monotonic()
    logger.info("api ready: database %s, redis %s", app.state.engine.url.render_as_string(), app.state.redis)
    try:
        yield
    finally:
        if app.state.redis is not None:
            await app.state.redis.aclose()
        inference_client = getattr(app.state, "inference_client", None)  # made lazily by service.gateway
        if inference_client is not None:
            await inference_client.aclose()
        app.state.engine.dispose()


# --- request ids, HTTP metrics and the last-resort 500 -------------------------------------------------------
class RequestContextMiddleware:
    """Adds `x-request-id` to every response (echoing the caller's), counts requests by route template, and turns
    an unexpected exception into a logged 500 envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                _observe(scope, status[0], time.perf_counter() - started)
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if status[0]:
                raise
            response = JSONResponse(envelope("Internal server error", type="server_error"), status_code=500)
            await response(scope, receive, send_with_id)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text_value = value.decode("latin-1")[:128]
            return text_value if text_value.isprintable() and text_value.strip() else None
    return None


def _observe(scope: Scope, status: int, seconds: float) -> None:
    route = scope.get("route")
    template = getattr(route, "path", None) or "unmatched"
    metrics.HTTP_REQUESTS.labels(method=scope["method"], route=template, status=str(status)).inc()
    metrics.HTTP_LATENCY.labels(method=scope["method"], route=template).observe(seconds)


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
    """200 when the database and Redis answer, else 503 naming what is down."""
    checks = {"database": await run_in_threadpool(_database_ok, request.app.state.engine)}
    checks["redis"] = await _redis_ok(request)
    status = 200 if all(checks.values()) else 503
    return JSONResponse(
        {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status_code=status
    )


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


async def metrics_text(request: Request) -> Response:
    """Prometheus text; job and queue gauges are read from the database and Redis at scrape."""
    counts = await run_in_threadpool(_job_counts, request.app.state.engine)
    for status in JobStatus:
        metrics.JOBS_BY_STATUS.labels(status=status.value).set(counts.get(status.value, 0))
    from service.deps import get_redis

    redis = await get_redis(request)
    try:
        if redis is not None:
            metrics.QUEUE_DEPTH.set(await redis.zcard(request.app.state.settings.queue_name))
    except Exception as exc:
        logger.warning("metrics: queue depth unavailable: %s", exc)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _job_counts(engine: Any) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.exec(select(JobRow.status, func.count()).group_by(JobRow.status)).all()  # type: ignore[call-overload]
    return {status: int(count) for status, count in rows}


# --- entry point -------------------------------------------------------------------------------------------
def _app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`api_workers > 1`): each builds its settings from `FT_*`."""
    return create_app(Settings())


def run_api(settings: Settings) -> int:
    """`tuneworks api`: create or upgrade the schema once, then serve with uvicorn. Returns the exit code."""
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    engine.dispose()
    common: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "timeout_graceful_shutdown": 10,
    }
    if settings.api_workers > 1:
        uvicorn.run("service.app:_app_from_env", factory=True, workers=settings.api_workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
    return 0
