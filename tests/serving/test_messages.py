"""The pub/sub messages between the gateway, the worker and the serve processes (no server needed): only
well-formed messages of the right type decode; anything else is None, never an exception."""

from __future__ import annotations

import pytest

from core.queue import AdapterEvent, LoadReply, LoadRequest


def test_messages_round_trip() -> None:
    request = LoadRequest(model="ft:m", base_model="org/base", reply_to="tuneworks:adapter-load:reply:x")
    assert LoadRequest.decode(request.encode()) == request
    assert LoadRequest.decode(request.encode().encode()) == request  # Redis delivers bytes
    event = AdapterEvent(event="deleted", model="ft:m")
    assert AdapterEvent.decode(event.encode()) == event
    assert LoadReply.decode(LoadReply(model="ft:m", loaded=True).encode()) == LoadReply(
        model="ft:m", loaded=True
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"model": "ft:m", "base_model": "org/base"',  # truncated
        b"[]",
        b'"ft:m"',
        b'{"model": "ft:m", "base_model": "org/base"}',  # no reply_to
        b'{"model": 1, "base_model": "org/base", "reply_to": "r"}',
        b'{"model": "ft:m", "base_model": "org/base", "reply_to": "r", "extra": 1}',
        b"\xff\xfe",
    ],
)
def test_load_request_rejects_malformed_messages(raw: bytes) -> None:
    assert LoadRequest.decode(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"null",
        b'{"event": "exploded", "model": "ft:m"}',
        b'{"event": "ready"}',
        b'{"event": "ready", "model": null}',
        b'{"event": "ready", "model": "ft:m", "reply_to": "r"}',  # a LoadRequest field: not an event
    ],
)
def test_adapter_event_rejects_malformed_messages(raw: bytes) -> None:
    assert AdapterEvent.decode(raw) is None


def test_a_load_request_is_not_an_adapter_event() -> None:
    request = LoadRequest(model="ft:m", base_model="org/base", reply_to="r").encode()
    assert AdapterEvent.decode(request) is None
    assert LoadRequest.decode(AdapterEvent(event="ready", model="ft:m").encode()) is None
