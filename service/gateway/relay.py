"""Proxying of the inference gateway: a validated, routed request forwarded to vLLM and its answer relayed back.

`complete()` validates (`checks`), routes (`routing`), forwards the body, rewrites `model` back to the caller's
name in the response and in every SSE chunk, maps vLLM's errors into our envelope, and records metrics and drift.

When vLLM answers 404 for a live fine-tuned model, its adapter is not loaded there (evicted, or vLLM restarted).
The API never loads it itself: the adapter's folder must be on the vLLM server's own disk, which only the serve
process of that base model can write (in Kubernetes the API is another pod with its own FT_HOME). So the gateway
asks that serve process over Redis (`core.queue.request_load`), waits for its reply, and retries once; when no
answer comes, the model exists, so the caller gets a 503 with `retry-after`, not a 404.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine

from core import metrics
from core.queue import LoadReply, request_load
from core.settings import Settings
from core.tables import Project
from service.errors import APIError, InvalidRequest, ServiceUnavailable
from service.gateway.checks import Endpoint, validate
from service.gateway.routing import Target, _not_found, resolve_target

logger = logging.getLogger(__name__)

PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_DROPPED = ("store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")  # accepted, ignored
_RETRY_AFTER = 5

RedisGetter = Callable[[], Awaitable[Any]]  # the app's Redis (connecting lazily), or None while it is down


@dataclass
class _Call:
    """One proxied request: its target, endpoint, timing and what the caller asked for."""

    target: Target
    endpoint: Endpoint
    body: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    wants_usage: bool = False

    def labels(self) -> tuple[str, str, str]:
        return self.target.base_model, self.target.kind, self.endpoint


def http_client(state: Any, settings: Settings) -> httpx.AsyncClient:
    """The process-wide client to the vLLM servers, created on first use and kept on `app.state`.

    Args:
        state: `app.state`.
        settings: the API settings (`inference_timeout`).

    Returns:
        The shared client.
    """
    client = getattr(state, "inference_client", None)
    if client is None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.inference_timeout, connect=5.0),
            limits=limits,
            headers=settings.vllm_headers(),
        )
        state.inference_client = client
    return client


def upstream_body(call: _Call) -> dict[str, Any]:
    """The body vLLM gets: `model` replaced, ignored fields dropped, usage always requested on streams.

    Args:
        call: the request being proxied (`wants_usage` is set from its `stream_options`).

    Returns:
        The JSON body for vLLM.
    """
    body = {k: v for k, v in call.body.items() if k not in _DROPPED}
    body["model"] = call.target.upstream
    if body.get("stream"):
        options = dict(body.get("stream_options") or {})
        call.wants_usage = bool(options.get("include_usage"))
        options["include_usage"] = True  # for our token metrics; dropped again when the caller did not ask
        body["stream_options"] = options
    return body


async def complete(
    *,
    state: Any,
    settings: Settings,
    engine: Engine,
    project: Project,
    endpoint: Endpoint,
    body: Any,
    redis: RedisGetter,
) -> JSONResponse | StreamingResponse:
    """Validate, route and proxy one completion request.

    Args:
        state: `app.state` (holds `store` and the shared HTTP client).
        settings: the API settings (`vllm_url()`, `inference_timeout`, `on_demand_load_timeout`).
        engine: the database, to map `ft:` names.
        project: the caller's project.
        endpoint: "chat" or "completions".
        body: the parsed JSON body.
        redis: returns the app's Redis (or None); called only when an adapter must be loaded on demand.

    Returns:
        The JSON completion, or an SSE stream when `stream` is true.

    Raises:
        InvalidRequest: a bad field (400, `param` set) or vLLM refused the request.
        ModelNotFound: unknown, deleted or another project's model.
        ServiceUnavailable: vLLM is not reachable, or a fine-tuned model's adapter could not be loaded in time
            (503 with `retry-after`).
    """
    validate(endpoint, body, extra_params=settings.inference_extra_param_names,
             max_prompts=settings.max_prompts_per_request)  # fmt: skip
    target = await resolve_target(settings=settings, engine=engine, project=project, model=body["model"])
    call = _Call(target=target, endpoint=endpoint, body=body)
    _observe_drift(state, call)
    client = http_client(state, settings)
    response = await _send(client, call)
    if response.status_code == 404 and target.row is not None:
        await response.aclose()
        await _load_on_demand(call, settings, redis)
        response = await _send(client, call)  # once: a second 404 is a 503 of its own (`_upstream_error`)
    if response.status_code != 200:
        raise await _upstream_error(call, response)
    if body.get("stream"):
        return StreamingResponse(_relay(call, response), media_type="text/event-stream")
    return await _finish(call, response)


async def _send(client: httpx.AsyncClient, call: _Call) -> httpx.Response:
    """POST the call to its vLLM server, with the answer streamed. Raises ServiceUnavailable when unreachable."""
    request = client.build_request("POST", call.target.url + PATHS[call.endpoint], json=upstream_body(call))
    try:
        return await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        _count(call, 503)
        logger.warning("model %s: vLLM %s unreachable: %s", call.target.requested, call.target.url, exc)
        raise ServiceUnavailable(
            f"The inference server for '{call.target.base_model}' is not reachable; try again shortly.",
            retry_after=_RETRY_AFTER,
        ) from exc


async def _load_on_demand(call: _Call, settings: Settings, redis: RedisGetter) -> None:
    """Have the serve process of the model's base model load its adapter, and wait until it has.

    Raises:
        ServiceUnavailable: Redis is down, no serve process answered in time, or the load failed.
    """
    row = call.target.row
    assert row is not None
    logger.info("model %s: unknown to vLLM; asking the serve process to load it", row.id)
    reply: LoadReply | None = None
    try:
        client = await redis()
        if client is not None:
            timeout = settings.on_demand_load_timeout
            reply = await request_load(client, model=row.id, base_model=row.base_model, timeout=timeout)
    except (RedisError, OSError) as exc:  # redis-py's ConnectionError is not an OSError
        logger.warning("model %s: cannot ask for an on-demand load: %s", row.id, exc)
    if reply is None or not reply.loaded:
        if reply is not None:
            logger.warning("model %s: the serve process could not load it: %s", row.id, reply.detail)
        raise _loading(call)


def _loading(call: _Call) -> ServiceUnavailable:
    """The answer for a live fine-tuned model that vLLM does not hold (yet): it exists, so 503, not 404."""
    _count(call, 503)
    return ServiceUnavailable(
        f"The model '{call.target.requested}' is not loaded yet; try again shortly.", retry_after=_RETRY_AFTER
    )


async def _upstream_error(call: _Call, response: httpx.Response) -> APIError:
    """Our envelope for a vLLM error answer, with adapter names replaced by the caller's model name."""
    raw = await response.aread()
    await response.aclose()
    if response.status_code == 404 and call.target.row is not None:
        return _loading(call)  # still unknown after an on-demand load: our database says the model exists
    _count(call, response.status_code)
    if response.status_code == 404:
        return _not_found(call.target.requested)
    if response.status_code in (401, 403):  # our key, not the caller's: an operator's mistake, never a 401
        logger.error(
            "vLLM %s refused the gateway's key (FT_VLLM_API_KEY differs from the server's)", call.target.url
        )
        return ServiceUnavailable(
            "The inference server refused the gateway; the operator must check its key."
        )
    try:
        error = json.loads(raw).get("error", {})
        message, param = str(error.get("message") or raw[:500].decode()), error.get("param")
    except (ValueError, AttributeError):
        message, param = raw[:500].decode(errors="replace") or "inference failed", None
    message = message.replace(call.target.upstream, call.target.requested)
    if response.status_code < 500:
        exc = InvalidRequest(message, param=param if isinstance(param, str) else None)
        exc.status_code = response.status_code  # 400 mostly; 413/422 keep their meaning
        return exc
    logger.warning(
        "model %s: vLLM answered %s: %s", call.target.requested, response.status_code, message[:300]
    )
    return APIError(f"The inference server failed: {message}")


async def _finish(call: _Call, response: httpx.Response) -> JSONResponse:
    try:
        data = json.loads(await response.aread())
    finally:
        await response.aclose()
    data["model"] = call.target.requested
    _record_usage(call, data.get("usage"))
    _count(call, 200)
    metrics.INFERENCE_LATENCY.labels(*call.labels()).observe(time.monotonic() - call.started)
    return JSONResponse(data)


async def _relay(call: _Call, response: httpx.Response) -> AsyncIterator[bytes]:
    """Pass vLLM's SSE stream through, rewriting `model`; a failure mid-stream becomes an error event."""
    first = True
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                yield b"data: [DONE]\n\n"
                break
            chunk = _rewrite_chunk(call, payload)
            if chunk is None:
                continue
            if first and _has_output(chunk):
                first = False
                metrics.INFERENCE_TTFT.labels(*call.labels()).observe(time.monotonic() - call.started)
            yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        _count(call, 200)
    except httpx.HTTPError as exc:
        logger.warning("model %s: stream from vLLM broke: %s", call.target.requested, exc)
        _count(call, 503)
        error = ServiceUnavailable("The inference server stopped while streaming; try again.")
        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
    finally:
        await response.aclose()
        metrics.INFERENCE_LATENCY.labels(*call.labels()).observe(time.monotonic() - call.started)


def _rewrite_chunk(call: _Call, payload: str) -> dict[str, Any] | None:
    """The chunk with the caller's model name; None for the usage chunk the caller did not ask for."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        return {"error": {"message": "malformed chunk from the inference server", "type": "server_error"}}
    if not isinstance(chunk, dict):
        return None
    if "model" in chunk:
        chunk["model"] = call.target.requested
    usage = chunk.get("usage")
    if usage:
        _record_usage(call, usage)
    if not call.wants_usage:
        chunk.pop("usage", None)
        if usage and not chunk.get("choices"):
            return None
    return chunk


def _has_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if (
            choice.get("text")
            or delta.get("content")
            or delta.get("tool_calls")
            or choice.get("finish_reason")
        ):
            return True
    return False


def _record_usage(call: _Call, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    base, kind, _ = call.labels()
    metrics.INFERENCE_TOKENS.labels(base, kind, "prompt").inc(int(usage.get("prompt_tokens") or 0))
    completion = int(usage.get("completion_tokens") or 0)
    metrics.INFERENCE_TOKENS.labels(base, kind, "completion").inc(completion)
    seconds = time.monotonic() - call.started
    if completion and seconds > 0:
        metrics.INFERENCE_OUTPUT_TPS.labels(*call.labels()).observe(completion / seconds)


def _count(call: _Call, status: int) -> None:
    metrics.INFERENCE_REQUESTS.labels(*call.labels(), str(status)).inc()


def _observe_drift(state: Any, call: _Call) -> None:
    """Feed an adapter request's prompt to the drift monitor; drift must never fail a request."""
    if call.target.row is None:
        return
    try:
        from core.drift_profile import prompt_of_messages
        from service import drift_monitor

        if call.endpoint == "chat":
            prompt = prompt_of_messages(call.body.get("messages") or [])
        else:
            raw = call.body.get("prompt")
            prompt = raw if isinstance(raw, str) else json.dumps(raw)
        drift_monitor.observe(state.store, call.target.requested, call.target.row.job_id, prompt)
    except Exception:
        logger.warning("model %s: drift observation failed", call.target.requested, exc_info=True)
