"""The gateway's request checks (no server needed): each bad field is a 400 naming it."""

from __future__ import annotations

import pytest

from service.errors import InvalidRequest
from service.gateway import validate

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"messages": MESSAGES}, "model"),
        ("chat", {"model": "m", "messages": []}, "messages"),
        ("chat", {"model": "m", "messages": ["hi"]}, "messages[0]"),
        ("chat", {"model": "m", "messages": MESSAGES, "n": 129}, "n"),
        ("chat", {"model": "m", "messages": MESSAGES, "n": True}, "n"),
        ("chat", {"model": "m", "messages": MESSAGES, "top_p": 1.5}, "top_p"),
        ("chat", {"model": "m", "messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
        (
            "chat",
            {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("chat", {"model": "m", "messages": MESSAGES, "logprobs": 3}, "logprobs"),
        ("chat", {"model": "m", "messages": MESSAGES, "audio": {"voice": "x"}}, "audio"),
        ("completions", {"model": "m"}, "prompt"),
        ("completions", {"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
        ("completions", {"model": "m", "prompt": "x", "stop": 3}, "stop"),
        ("chat", {"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        ("chat", {"model": "m", "messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0].role"),
        # vLLM's own extensions that change what the server does are refused unless the operator allows them
        ("chat", {"model": "m", "messages": MESSAGES, "chat_template": "{{ 7 * 7 }}"}, "chat_template"),
        ("chat", {"model": "m", "messages": MESSAGES, "priority": -100}, "priority"),
        ("completions", {"model": "m", "prompt": "x", "kv_transfer_params": {}}, "kv_transfer_params"),
        ("completions", {"model": "m", "prompt": ["x"] * 33}, "prompt"),
        ("completions", {"model": "m", "prompt": [["x"]]}, "prompt"),
        ("completions", {"model": "m", "prompt": {"text": "x"}}, "prompt"),
        ("completions", {"model": "m", "prompt": []}, "prompt"),
    ],
)
def test_bad_fields_are_rejected_with_their_param(endpoint, body, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest) as info:
        validate(endpoint, body)
    assert info.value.param == param


def test_good_requests_pass() -> None:
    validate("chat", {"model": "m", "messages": MESSAGES, "n": 2, "logprobs": True, "top_logprobs": 3})
    validate(
        "chat",
        {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
    )
    validate("completions", {"model": "m", "prompt": ["a", "b"], "logprobs": 2, "echo": True, "stop": ["\n"]})
    validate("completions", {"model": "m", "prompt": [1, 2, 3]})
    validate("completions", {"model": "m", "prompt": [[1, 2], [3]] * 16})
    validate("chat", {"model": "m", "messages": MESSAGES, "top_k": 5}, extra_params=frozenset({"top_k"}))


def test_the_operator_chooses_the_allowed_extensions() -> None:
    body = {"model": "m", "messages": MESSAGES, "top_k": 5}
    with pytest.raises(InvalidRequest):
        validate("chat", body, extra_params=frozenset())
    validate("chat", body | {"min_p": 0.1}, extra_params=frozenset({"top_k", "min_p"}))
