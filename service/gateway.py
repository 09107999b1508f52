"""The inference gateway: `/v1/chat/completions` and `/v1/completions` proxied to the right vLLM server.

`resolve_target()` maps the request's `model` to a server and the name vLLM knows: a served base model id goes
as is; an `ft:` name must be a live model of the caller's project (anything else is the same 404
`model_not_found`) and becomes its adapter name. `complete()` validates a few fields, forwards the body, rewrites
`model` back to the caller's name in the response and in every SSE chunk, maps vLLM's errors into our envelope,
loads an adapter on demand when vLLM does not know it yet (then retries once), and records metrics and drift.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from core import metrics
from core.settings import Settings
from core.tables import ModelRow, Project
from service.errors import APIError, InvalidRequest, ModelNotFound, ServiceUnavailable

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_UNSUPPORTED = ("audio", "modalities", "web_search_options", "prediction")  # 400: cannot be honoured here
_DROPPED = ("store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")  # accepted, ignored
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_RETRY_AFTER = 5


@dataclass
class Target:
    """Where a request goes: the vLLM server of `base_model` and the name it knows the model by."""

    requested: str  # the name the caller sent (echoed in responses)
    base_model: str
    url: str
    upstream: str  # base model id or adapter name
    row: ModelRow | None = None  # the fine-tuned model, for adapter requests

    @property
    def kind(self) -> str:
        return "base" if self.row is None else "adapter"


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


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


def _live_row(engine: Engine, project: Project, model: str) -> ModelRow | None:
    with Session(engine, expire_on_commit=False) as session:
        query = select(ModelRow).where(
            ModelRow.id == model, ModelRow.project_id == project.id, col(ModelRow.deleted).is_(False)
        )
        return session.exec(query).first()


async def resolve_target(*, settings: Settings, engine: Engine, project: Project, model: str) -> Target:
    """The server and upstream name for `model` as `project` asked for it.

    Raises:
        ModelNotFound: not a served base model, nor a live fine-tuned model of `project` on a served base.
    """
    from serving.adapters import vllm_name

    if not model.startswith("ft:"):
        url = settings.vllm_url(model)
        if url is None:
            raise _not_found(model)
        return Target(requested=model, base_model=model, url=url, upstream=model)
    row = await run_in_threadpool(_live_row, engine, project, model)
    url = settings.vllm_url(row.base_model) if row is not None else None
    if row is None or url is None:
        raise _not_found(model)
    return Target(requested=model, base_model=row.base_model, url=url, upstream=vllm_name(row), row=row)


# --- validation --------------------------------------------------------------------------------------------
def validate(endpoint: Endpoint, body: Any) -> None:
    """Check the fields the gateway relies on before proxying.

    Raises:
        InvalidRequest: with `param` naming the first bad field.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    for name in _UNSUPPORTED:
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this server.", param=name)
    if endpoint == "chat":
        _check_messages(body.get("messages"))
    elif body.get("prompt") is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    _check_numbers(body)
    _check_stream(body)
    _check_stop(body.get("stop"))
    _check_logprobs(endpoint, body)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest("Each message must be an object.", param=f"messages[{index}]")
        if message.get("role") not in _ROLES:
            raise InvalidRequest(
                f"Invalid role {message.get('role')!r}; expected one of {', '.join(sorted(_ROLES))}.",
                param=f"messages[{index}].role",
            )


_RANGES: dict[str, tuple[float, float, bool]] = {  # field -> (low, high, integer)
    "n": (1, 128, True),
    "temperature": (0, 2, False),
    "top_p": (0, 1, False),
    "max_tokens": (0, 1 << 31, True),
    "max_completion_tokens": (0, 1 << 31, True),
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    "best_of": (0, 20, True),
    "seed": (-(1 << 63), (1 << 63) - 1, True),
}


def _check_numbers(body: dict[str, Any]) -> None:
    for name, (low, high, integer) in _RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        kind_ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not kind_ok or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise InvalidRequest(f"'{name}' must be {kind} between {low} and {high}.", param=name)


def _check_stream(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true.", param="stream_options")


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not 1 <= len(stop) <= 4 or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or an array of 1 to 4 strings.", param="stop")


def _check_logprobs(endpoint: Endpoint, body: dict[str, Any]) -> None:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if endpoint == "completions":
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5
        ):
            raise InvalidRequest("'logprobs' must be an integer between 0 and 5.", param="logprobs")
        return
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("'logprobs' must be a boolean.", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise InvalidRequest("'top_logprobs' must be an integer between 0 and 20.", param="top_logprobs")
        if not logprobs:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


# --- proxying ----------------------------------------------------------------------------------------------
def http_client(state: Any, settings: Settings) -> httpx.AsyncClient:
    """The process-wide client to the vLLM servers, created on first use and kept on `app.state`."""
    client = getattr(state, "inference_client", None)
    if client is None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.inference_timeout, connect=5.0), limits=limits
        )
        state.inference_client = client
    return client


def upstream_body(call: _Call) -> dict[str, Any]:
    """The body vLLM gets: `model` replaced, ignored fields dropped, usage always requested on streams."""
    body = {k: v for k, v in call.body.items() if k not in _DROPPED}
    body["model"] = call.target.upstream
    if body.get("stream"):
        options = dict(body.get("stream_options") or {})
        call.wants_usage = bool(options.get("include_usage"))
        options["include_usage"] = True  # for our token metrics; dropped again when the caller did not ask
        body["stream_options"] = options
    return body


async def complete(
    *, state: Any, settings: Settings, engine: Engine, project: Project, endpoint: Endpoint, body: Any
) -> JSONResponse | StreamingResponse:
    """Validate, route and proxy one completion request.

    Args:
        state: `app.state` (holds `store` and the shared HTTP client).
        settings: the API settings (`vllm_url()`, `inference_timeout`).
        engine: the database, to map `ft:` names.
        project: the caller's project.
        endpoint: "chat" or "completions".
        body: the parsed JSON body.

    Returns:
        The JSON completion, or an SSE stream when `stream` is true.

    Raises:
        InvalidRequest: a bad field (400, `param` set) or vLLM refused the request.
        ModelNotFound: unknown, deleted or another project's model.
        ServiceUnavailable: vLLM is not reachable (503 with `retry-after`).
    """
    validate(endpoint, body)
    target = await resolve_target(settings=settings, engine=engine, project=project, model=body["model"])
    call = _Call(target=target, endpoint=endpoint, body=body)
    _observe_drift(state, call)
    client = http_client(state, settings)
    try:
        response = await _send(client, call, upstream_body(call))
        if (
            response.status_code == 404
            and target.row is not None
            and await _load_on_demand(state, settings, call)
        ):
            await response.aclose()
            response = await _send(client, call, upstream_body(call))
    except httpx.HTTPError as exc:
        _count(call, 503)
        logger.warning("model %s: vLLM %s unreachable: %s", target.requested, target.url, exc)
        raise ServiceUnavailable(
            f"The inference server for '{target.base_model}' is not reachable; try again shortly.",
            retry_after=_RETRY_AFTER,
        ) from exc
    if response.status_code != 200:
        raise await _upstream_error(call, response)
    if body.get("stream"):
        return StreamingResponse(_relay(call, response), media_type="text/event-stream")
    return await _finish(call, response)


async def _send(client: httpx.AsyncClient, call: _Call, body: dict[str, Any]) -> httpx.Response:
    request = client.build_request("POST", call.target.url + PATHS[call.endpoint], json=body)
    return await client.send(request, stream=True)


async def _load_on_demand(state: Any, settings: Settings, call: _Call) -> bool:
    from serving.adapters import ensure_loaded

    assert call.target.row is not None
    logger.info("model %s: unknown to vLLM; loading on demand", call.target.requested)
    return await ensure_loaded(
        settings=settings,
        store=state.store,
        row=call.target.row,
        client=http_client(state, settings),
        url=call.target.url,
        trigger="on_demand",
    )


async def _upstream_error(call: _Call, response: httpx.Response) -> APIError:
    """Our envelope for a vLLM error answer, with adapter names replaced by the caller's model name."""
    raw = await response.aread()
    await response.aclose()
    _count(call, response.status_code)
    try:
        error = json.loads(raw).get("error", {})
        message, param = str(error.get("message") or raw[:500].decode()), error.get("param")
    except (ValueError, AttributeError):
        message, param = raw[:500].decode(errors="replace") or "inference failed", None
    message = message.replace(call.target.upstream, call.target.requested)
    if response.status_code == 404:
        return _not_found(call.target.requested)
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
