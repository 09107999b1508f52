"""Request validation of the inference gateway: the fields it relies on, checked before anything is proxied.

Each bad field is a 400 `InvalidRequest` whose `param` names it (dotted path for nested fields), as OpenAI does;
fields vLLM checks itself pass through untouched.
"""

from __future__ import annotations

from typing import Any, Literal

from service.errors import InvalidRequest

Endpoint = Literal["chat", "completions"]
_UNSUPPORTED = ("audio", "modalities", "web_search_options", "prediction")  # 400: cannot be honoured here
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

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


def validate(endpoint: Endpoint, body: Any) -> None:
    """Check the fields the gateway relies on before proxying.

    Args:
        endpoint: "chat" or "completions".
        body: the parsed JSON body.

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
