"""Limits on what one request, and one project, may ask of the API: request rate, JSON nesting, NUL characters.

Pure checks with no ASGI in them; `middleware.RequestGuardMiddleware` applies them to every request before a route
sees it, so no route, model or query can be reached by a body too deep to parse or an id the database refuses.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Any
from urllib.parse import parse_qsl

from service.errors import InvalidRequest, RateLimited

MAX_JSON_DEPTH = 64  # deeper nesting of arrays and objects is refused before a parser recurses into it
MAX_NUMBER_DIGITS = 4300  # Python's json refuses longer integers (`sys.get_int_max_str_digits()`)
NUL = "\x00"  # PostgreSQL text refuses it (a DataError), so it never reaches a query

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # one JSON string literal, escapes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTAS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # `\u0000` that is an escape, not `\\u0000` text


# --- request rate --------------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key (a project id): `per_minute` requests a minute, bursts of up to `per_minute`.

    In process memory, so each API process (uvicorn worker, pod) counts on its own.
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one request from `key`'s bucket.

        Raises:
            RateLimited: the bucket is empty; `retry-after` (seconds) and `retry-after-ms` say when a token is
                back, which the openai SDK honours before its retry.
        """
        wait = self._take(key, time.monotonic())
        if wait > 0:
            raise RateLimited(
                f"Rate limit reached: {self.per_minute} requests per minute for this project. "
                f"Try again in {wait:.1f}s.",
                code="rate_limit_exceeded",
                headers={"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))},
            )

    def _take(self, key: str, now: float) -> float:
        """Seconds until `key` may make a request (0 when it may now, and then a token is taken)."""
        rate = self.per_minute / 60.0
        with self._lock:
            bucket = self._buckets.setdefault(key, _Bucket(tokens=float(self.per_minute), at=now))
            bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate


# --- JSON bodies ---------------------------------------------------------------------------------------------
def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when `body` nests arrays and objects more than `limit` levels deep, counting unclosed ones (what a
    parser would recurse into). Brackets inside strings do not count. C-level loops only, never recursion."""
    return _too_deep(_STRING.sub(b"", body), limit)


def _too_deep(outside_strings: bytes, limit: int) -> bool:
    brackets = outside_strings.translate(_DELTAS, _NOT_BRACKETS)
    if brackets.count(1) <= limit:  # the depth is at most the number of opening brackets
        return False
    return max(accumulate(array("b", brackets))) > limit


def check_json_body(body: bytes) -> None:
    """Refuse a JSON body that a parser cannot take safely (nested too deeply, a number too long to convert) or
    that holds a NUL character (`\\u0000`), which the database would refuse.

    Raises:
        InvalidRequest: nesting deeper than `MAX_JSON_DEPTH` (`code: json_too_deep`); a number of more than
            `MAX_NUMBER_DIGITS` digits (`code: number_too_long`); a NUL in a string, with `param` the dotted path
            of that string (`code: invalid_value`).
    """
    outside_strings = _STRING.sub(b"", body)
    if _too_deep(outside_strings, MAX_JSON_DEPTH):
        raise InvalidRequest(
            f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
            code="json_too_deep",
        )
    if _LONG_NUMBER.search(outside_strings):
        raise InvalidRequest(
            f"The request body has a number of more than {MAX_NUMBER_DIGITS} digits.", code="number_too_long"
        )
    if b"\\u0000" in body and _NUL_ESCAPE.search(body):
        raise nul_error(_path_of_nul(body))


def check_query(query_string: bytes) -> None:
    """Refuse a query string with a NUL in a name or a value.

    Raises:
        InvalidRequest: `param` names the query parameter (`metadata` for `metadata[key]` filters).
    """
    if b"%00" not in query_string and b"\x00" not in query_string:
        return
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if NUL in name or NUL in value:
            raise nul_error(name.split("[", 1)[0] or None)


def check_path_params(params: dict[str, Any]) -> None:
    """Refuse a path parameter (an id) with a NUL in it.

    Raises:
        InvalidRequest: `param` names the path parameter.
    """
    for name, value in params.items():
        if isinstance(value, str) and NUL in value:
            raise nul_error(name)


def nul_error(param: str | None) -> InvalidRequest:
    where = f"'{param}'" if param else "the request"
    return InvalidRequest(
        f"Invalid value for {where}: NUL characters (\\u0000) are not allowed.",
        param=param,
        code="invalid_value",
    )


def _path_of_nul(body: bytes) -> str | None:
    """The dotted path of the first key or string value of `body` that holds a NUL (None when it cannot tell)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None  # the route's own parser reports the body as invalid JSON
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and NUL in item:
            return path or None
        if isinstance(item, dict):
            for key in item:
                if NUL in key:
                    return path or None
            stack += reversed([(f"{path}.{k}" if path else k, v) for k, v in item.items()])
        elif isinstance(item, list):
            stack += reversed([(f"{path}[{i}]", v) for i, v in enumerate(item)])
    return None
