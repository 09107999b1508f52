"""A small client of vLLM's run-time LoRA endpoints: load, unload, and list the adapters a server has registered.

Only the serve process calls these, with folders it materialised on its own disk (`serving.materialise`).
Failures are logged and counted in `ft_adapter_loads_total`, never raised, except by `loaded_names()` (the
sweep must know the server did not answer rather than think it holds no adapter).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx

from core.metrics import ADAPTER_LOAD_SECONDS, ADAPTER_LOADS

logger = logging.getLogger(__name__)


async def load(
    *, client: httpx.AsyncClient, url: str, name: str, path: Path, base_model: str, trigger: str
) -> bool:
    """Load adapter `name` from `path` into the vLLM server at `url`.

    Args:
        client: the HTTP client.
        url: the vLLM server.
        name: the adapter's vLLM name.
        path: its materialised folder (on the server's disk).
        base_model: the server's base model (a metric label).
        trigger: why it is loaded (`ready`, `sweep`, `restart`, `on_demand`; a metric label).

    Returns:
        True when the adapter is loaded, including when it was loaded already.
    """
    started = time.monotonic()
    try:
        response = await client.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
    except httpx.HTTPError as exc:
        logger.warning("adapter %s: load into %s failed: %s", name, url, exc)
        ADAPTER_LOADS.labels(base_model, trigger, "error").inc()
        return False
    ok = response.status_code == 200 or _already_loaded(response)
    ADAPTER_LOADS.labels(base_model, trigger, "ok" if ok else "error").inc()
    if response.status_code == 200:
        ADAPTER_LOAD_SECONDS.labels(base_model).observe(time.monotonic() - started)
        logger.info("adapter %s: loaded (%s) in %.3f s", name, trigger, time.monotonic() - started)
    elif not ok:
        logger.warning("adapter %s: load answered %s: %s", name, response.status_code, response.text[:300])
    return ok


def _already_loaded(response: httpx.Response) -> bool:
    # vLLM answers a second load of a name with a 400 that has no error code of its own.
    return response.status_code == 400 and "already been loaded" in response.text


async def unload(*, client: httpx.AsyncClient, url: str, name: str) -> None:
    """Unload adapter `name` from the server at `url` (an adapter that is not loaded is fine).

    Args:
        client: the HTTP client.
        url: the vLLM server.
        name: the adapter's vLLM name.
    """
    try:
        response = await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})
    except httpx.HTTPError as exc:
        logger.warning("adapter %s: unload from %s failed: %s", name, url, exc)
        return
    if response.status_code not in (200, 404):
        logger.warning("adapter %s: unload answered %s: %s", name, response.status_code, response.text[:300])
    else:
        logger.info("adapter %s: unloaded", name)


async def loaded_names(*, client: httpx.AsyncClient, url: str, base_model: str) -> set[str]:
    """Names of the adapters the server at `url` has registered (its `/v1/models` minus the base model).

    Args:
        client: the HTTP client.
        url: the vLLM server.
        base_model: the server's served model name, left out of the answer.

    Returns:
        The adapter names.

    Raises:
        httpx.HTTPError: the server did not answer, or answered with an error.
    """
    response = await client.get(f"{url}/v1/models")
    response.raise_for_status()
    return {m["id"] for m in response.json().get("data", []) if m.get("id") != base_model}
