"""Public object ids, in OpenAI's shapes (`file-…`, `ftjob-…`, `ftevent-…`, `ftckpt-…`)."""

from __future__ import annotations

import secrets
import string
import time

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """A random id such as `file-9f3Kc...`; `prefix` includes its separator."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def now() -> int:
    """Unix seconds, the timestamp unit of every OpenAI object."""
    return int(time.time())
