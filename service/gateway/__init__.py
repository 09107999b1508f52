"""The inference gateway: `/v1/chat/completions` and `/v1/completions` proxied to the right vLLM server.

`checks` validates the request, `routing` maps its `model` to a server and the name vLLM knows, and `relay`
proxies it (asking the serve process over Redis to load an adapter vLLM does not hold). The API never imports
`serving`: adapters are materialised and loaded only by the serve process, on the vLLM server's own disk.
"""

from __future__ import annotations

from service.gateway.checks import Endpoint, validate
from service.gateway.relay import PATHS, RedisGetter, complete, http_client, upstream_body
from service.gateway.routing import Target, resolve_target

__all__ = [
    "PATHS",
    "Endpoint",
    "RedisGetter",
    "Target",
    "complete",
    "http_client",
    "resolve_target",
    "upstream_body",
    "validate",
]
