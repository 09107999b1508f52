"""The API's ASGI middleware, outermost first.

- `RequestContextMiddleware`: an `x-request-id` on every response, HTTP metrics with bounded labels (a known
  method or `other`, a route template or `unmatched`, the status), and the last-resort 500 envelope.
- `RequestGuardMiddleware`: what every request must pass before a route reads or parses anything. On `/v1/`
  paths the `Authorization` key (a 401 without reading the body) and the project's request rate (429); then no
  NUL in the query or the path (400 naming the param); then the body: a `content-length` over the limit is a 413
  at once, and the bytes are counted as they arrive (413 as soon as the limit is passed). A JSON body (at most
  `FT_MAX_REQUEST_BYTES`) is read whole and checked for nesting depth and NUL characters before a route parses
  it, so no route, the completions gateway included, can be reached by a body too deep to parse. A file upload
  (`POST /v1/files`, and an adapter import `POST /v1/models/import`) is streamed to its route, counted against
  `FT_MAX_UPLOAD_BYTES` plus the multipart fields.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import metrics
from service import limits
from service.errors import APIError, PayloadTooLarge, envelope
from service.files import MULTIPART_OVERHEAD_BYTES

logger = logging.getLogger(__name__)

_ID_PREFIX = secrets.token_hex(6)  # request ids: unique per process (a random prefix and a counter), cheap
_ID_COUNTER = itertools.count()

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})  # any other is `other`
OFF_LOOP_BYTES = 1024 * 1024  # JSON bodies larger than this are checked in a thread, off the event loop
_FORM_TYPES = ("multipart/", "application/x-www-form-urlencoded")


# --- request ids, HTTP metrics and the last-resort 500 -------------------------------------------------------
class RequestContextMiddleware:
    """Adds `x-request-id` to every response (echoing the caller's), counts requests by route template, and turns
    an unexpected exception into a logged 500 envelope."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or f"req_{_ID_PREFIX}{next(_ID_COUNTER):010x}"
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                _observe(scope, self.routes, status[0], time.perf_counter() - started)
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s: %s %s failed", request_id, _method(scope), scope["path"])
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


def _method(scope: Scope) -> str:
    """The method as a metric label: h11 accepts any token as a method, so unknown ones are all `other`."""
    return scope["method"] if scope["method"] in METHODS else "other"


def _observe(scope: Scope, routes: list[BaseRoute], status: int, seconds: float) -> None:
    route = scope.get("route") or match_route(scope, routes)[0]  # no route yet when the guard answered
    template = getattr(route, "path", None) or "unmatched"
    method = _method(scope)
    metrics.HTTP_REQUESTS.labels(method=method, route=template, status=str(status)).inc()
    metrics.HTTP_LATENCY.labels(method=method, route=template).observe(seconds)


def match_route(scope: Scope, routes: list[BaseRoute]) -> tuple[BaseRoute | None, dict[str, Any]]:
    """The route `scope` goes to (or whose path it matches, for another method) and its path parameters."""
    partial: tuple[BaseRoute | None, dict[str, Any]] = (None, {})
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route, child.get("path_params", {})
        if match == Match.PARTIAL and partial[0] is None:
            partial = (route, child.get("path_params", {}))
    return partial


# --- the guard -------------------------------------------------------------------------------------------------
class RequestGuardMiddleware:
    """Authentication, request rate, NUL-free ids and bounded bodies, before any route reads the request."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            checked = await self._check(scope, receive)
        except APIError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
            await response(scope, receive, send)
            return
        if checked is not None:  # None: the client went away while sending its body
            await self.app(scope, checked, send)

    async def _check(self, scope: Scope, receive: Receive) -> Receive | None:
        """The `receive` the app gets, after every check has passed.

        Raises:
            Unauthorized, RateLimited, InvalidRequest, PayloadTooLarge: the answer to send instead.
        """
        state = scope["app"].state
        if scope["path"].startswith("/v1/"):
            authorization = Headers(scope=scope).get("authorization", "")
            project = await state.key_cache.resolve(authorization, state.database)
            scope.setdefault("state", {})["project"] = project  # `deps.ProjectDep` takes it from here
            if state.rate_limiter is not None:
                state.rate_limiter.check(project.id)
        limits.check_query(scope.get("query_string", b""))
        if limits.NUL in scope["path"]:
            limits.check_path_params(match_route(scope, self.routes)[1])
            raise limits.nul_error(None)
        if _is_upload(scope):
            limit = state.settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
            _check_declared_length(scope, limit)
            return _counting(receive, limit)
        return await self._checked_body(scope, receive, state.settings.max_request_bytes)

    async def _checked_body(self, scope: Scope, receive: Receive, limit: int) -> Receive | None:
        _check_declared_length(scope, limit)
        body = await _read_body(receive, limit)
        if body is None:
            return None
        content_type = Headers(scope=scope).get("content-type", "")
        if body and not content_type.startswith(_FORM_TYPES):  # JSON, whatever the header says
            if len(body) > OFF_LOOP_BYTES:
                await run_in_threadpool(limits.check_json_body, body)
            else:
                limits.check_json_body(body)
        return _replay(body, receive)


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"] in ("/v1/files", "/v1/models/import")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )


def _check_declared_length(scope: Scope, limit: int) -> None:
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when the client disconnects first.

    Raises:
        PayloadTooLarge: as soon as more than `limit` bytes have arrived.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, then whatever comes next (the disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _counting(receive: Receive, limit: int) -> Receive:
    """A `receive` that raises `PayloadTooLarge` (rendered by the app's error handler) past `limit` bytes."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return counted
