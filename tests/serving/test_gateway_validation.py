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
