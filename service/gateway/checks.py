"""Request validation of the inference gateway: the fields it relies on, checked before anything is proxied.

Each bad field is a 400 `InvalidRequest` whose `param` names it (dotted path for nested fields), as OpenAI does;
fields vLLM checks itself pass through untouched.
"""

from __future__ import annotations

from typing import Any, Literal

from service.errors import InvalidRequest

Endpoint = Literal["chat", "completions"]
# The request fields of OpenAI's API (the openai SDK's `CompletionCreateParams` for each endpoint). Anything else
# is one of vLLM's own extensions (`chat_template`, `priority`, `logits_processors`, `kv_transfer_params`, ...),
# some of which let one caller change what the server does for everyone: refused unless the operator allows it
# by name (FT_INFERENCE_EXTRA_PARAMS).
_COMMON = frozenset({
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed",
    "stop", "stream", "stream_options", "temperature", "top_p", "user",
})  # fmt: skip
OPENAI_FIELDS: dict[str, frozenset[str]] = {
    "chat": _COMMON | {
        "messages", "top_logprobs", "max_completion_tokens", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "function_call", "functions", "store", "metadata", "service_tier",
        "reasoning_effort", "modalities", "audio", "prediction", "web_search_options", "safety_identifier",
        "prompt_cache_key", "verbosity",
    },
    "completions": _COMMON | {"prompt", "best_of", "echo", "suffix"},
}  # fmt: skip
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


def validate(
    endpoint: Endpoint, body: Any, *, extra_params: frozenset[str] = frozenset(), max_prompts: int = 32
) -> None:
    """Check the fields the gateway relies on before proxying.

    Args:
        endpoint: "chat" or "completions".
        body: the parsed JSON body.
        extra_params: vLLM extension fields the operator allows (FT_INFERENCE_EXTRA_PARAMS).
        max_prompts: the most prompts one completions request may carry (FT_MAX_PROMPTS_PER_REQUEST).

    Raises:
        InvalidRequest: with `param` naming the first bad field.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - OPENAI_FIELDS[endpoint] - extra_params)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    for name in _UNSUPPORTED:
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this server.", param=name)
    if endpoint == "chat":
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body.get("prompt"), max_prompts)
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
        role = message.get("role")
        if (
            not isinstance(role, str) or role not in _ROLES
        ):  # a list or an object is not hashable: check the type
            raise InvalidRequest(
                f"Invalid role {str(role)[:40]!r}; expected one of {', '.join(sorted(_ROLES))}.",
                param=f"messages[{index}].role",
            )


def _check_prompt(prompt: Any, max_prompts: int) -> None:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids (OpenAI's forms)."""
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("'prompt' must be a string or a non-empty array.", param="prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return  # one prompt of token ids
    if not all(isinstance(x, str) or _token_ids(x) for x in prompt):
        raise InvalidRequest(
            "'prompt' must be a string, an array of strings, or an array of arrays of token ids.",
            param="prompt",
        )
    if len(prompt) > max_prompts:
        raise InvalidRequest(
            f"'prompt' holds {len(prompt)} prompts; at most {max_prompts} are allowed per request.",
            param="prompt",
        )


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
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
