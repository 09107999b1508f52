"""The life cycle of fine-tuned adapters in a vLLM server: materialise, load, unload, remove.

The database (`ModelRow`) says which adapters exist; the artifact store holds their PEFT folders. For a vLLM
server, an adapter is *materialised* as `FT_HOME/served/<base folder>/<adapter name>/` (weights hard-linked or
copied, `base_model_name_or_path` rewritten to the server's exact `--model` string so that vLLM's filesystem
resolver accepts it for on-demand loading) and then *loaded* with `POST /v1/load_lora_adapter`. Names reaching
vLLM are `core.naming.adapter_name()` of our own job ids, and paths come only from store keys checked by
`ArtifactStore.path`.

`ServedAdapters` keeps one server in step with the database: it reacts to `ADAPTER_CHANNEL` messages, sweeps the
database every `SWEEP_SECONDS` as a safety net, and loads the active adapters again after a vLLM restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.metrics import ADAPTER_LOAD_SECONDS, ADAPTER_LOADS, ADAPTERS_LOADED
from core.naming import adapter_name
from core.queue import ADAPTER_CHANNEL
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import ModelRow
from serving.engine import model_arg, resolver_dir

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 15.0
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def vllm_name(row: ModelRow) -> str:
    """The name vLLM knows `row`'s adapter by."""
    return adapter_name(row.job_id, row.checkpoint_step)


def materialise(*, settings: Settings, store: ArtifactStore, row: ModelRow) -> Path:
    """Place `row`'s adapter in the resolver folder of its base model (idempotent). Returns the folder.

    Raises:
        ValueError: the store key is not one of ours.
        FileNotFoundError: the stored adapter lacks `adapter_config.json` or `adapter_model.safetensors`.
    """
    source = store.path(row.storage_key)
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model {row.id}: adapter in the store lacks {', '.join(missing)}")
    target = resolver_dir(settings, row.base_model) / vllm_name(row)
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = model_arg(settings, row.base_model)
    if _up_to_date(target, config):
        return target
    staging = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _link_or_copy(source / "adapter_model.safetensors", staging / "adapter_model.safetensors")
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    logger.info("model %s: materialised as %s", row.id, target)
    return target


def _up_to_date(target: Path, config: dict[str, Any]) -> bool:
    try:
        return (target / ADAPTER_FILES[1]).is_file() and json.loads(
            (target / ADAPTER_FILES[0]).read_text()
        ) == config
    except (OSError, ValueError):
        return False


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem: copy
        shutil.copy2(source, target)


def remove(*, settings: Settings, row: ModelRow) -> None:
    """Delete `row`'s folder from the resolver folder, so vLLM cannot load it on demand any more."""
    shutil.rmtree(resolver_dir(settings, row.base_model) / vllm_name(row), ignore_errors=True)


async def load(
    *, client: httpx.AsyncClient, url: str, name: str, path: Path, base_model: str, trigger: str
) -> bool:
    """Load adapter `name` from `path` into the vLLM server at `url`. Returns True when it is loaded.

    An adapter that is loaded already counts as loaded. Failures are logged and counted, never raised.
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
    """Unload adapter `name` from the server at `url` (an adapter that is not loaded is fine)."""
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

    Raises:
        httpx.HTTPError: the server did not answer.
    """
    response = await client.get(f"{url}/v1/models")
    response.raise_for_status()
    return {m["id"] for m in response.json().get("data", []) if m.get("id") != base_model}


async def ensure_loaded(
    *,
    settings: Settings,
    store: ArtifactStore,
    row: ModelRow,
    client: httpx.AsyncClient,
    url: str,
    trigger: str,
) -> bool:
    """Materialise and load `row`'s adapter into the server at `url`. Returns True when it is loaded."""
    try:
        path = await asyncio.to_thread(materialise, settings=settings, store=store, row=row)
    except (OSError, ValueError) as exc:
        logger.error("model %s: cannot materialise adapter: %s", row.id, exc)
        ADAPTER_LOADS.labels(row.base_model, trigger, "error").inc()
        return False
    return await load(
        client=client, url=url, name=vllm_name(row), path=path, base_model=row.base_model, trigger=trigger
    )


class ServedAdapters:
    """Keeps the adapters of one base model's vLLM server in step with the database."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        store: ArtifactStore,
        base_model: str,
        url: str,
        client: httpx.AsyncClient,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.base_model = base_model
        self.url = url
        self.client = client
        self.sweep_seconds = sweep_seconds
        self._lock = asyncio.Lock()

    def _rows(self) -> list[ModelRow]:
        with Session(self.engine, expire_on_commit=False) as session:
            query = (
                select(ModelRow)
                .where(ModelRow.base_model == self.base_model)
                .order_by(col(ModelRow.pk).desc())
            )
            return list(session.exec(query).all())

    def _row(self, model_id: str) -> ModelRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.exec(select(ModelRow).where(ModelRow.id == model_id)).first()

    async def sync(self, trigger: str = "sweep") -> None:
        """Materialise every live adapter, load the newest ones (up to `--max-cpu-loras`), drop deleted ones."""
        async with self._lock:
            rows = await asyncio.to_thread(self._rows)
            live = [r for r in rows if not r.deleted]
            try:
                loaded = await loaded_names(client=self.client, url=self.url, base_model=self.base_model)
            except httpx.HTTPError as exc:
                logger.info("vllm %s: not reachable for the adapter sweep: %s", self.base_model, exc)
                return
            await self._drop(rows, live, loaded)
            limit = max(self.settings.vllm_max_cpu_loras, 1)
            for index, row in enumerate(live):
                if vllm_name(row) in loaded:
                    continue
                if index < limit:
                    await self._load(row, trigger)
                else:
                    await self._materialise(row)
            await self._count()

    async def _drop(self, rows: list[ModelRow], live: list[ModelRow], loaded: set[str]) -> None:
        live_names = {vllm_name(r) for r in live}
        for row in rows:
            if row.deleted:
                await self._unload(row, loaded)
        folder = resolver_dir(self.settings, self.base_model)
        for child in folder.iterdir():
            if not child.name.startswith(".") and child.name not in live_names:
                shutil.rmtree(child, ignore_errors=True)
        for name in loaded - live_names:
            await unload(client=self.client, url=self.url, name=name)

    async def _materialise(self, row: ModelRow) -> None:
        try:
            await asyncio.to_thread(materialise, settings=self.settings, store=self.store, row=row)
        except (OSError, ValueError) as exc:
            logger.error("model %s: cannot materialise adapter: %s", row.id, exc)

    async def _load(self, row: ModelRow, trigger: str) -> bool:
        return await ensure_loaded(
            settings=self.settings,
            store=self.store,
            row=row,
            client=self.client,
            url=self.url,
            trigger=trigger,
        )

    async def _unload(self, row: ModelRow, loaded: set[str] | None = None) -> None:
        remove(settings=self.settings, row=row)  # first, so that no request reloads it on demand
        if loaded is None or vllm_name(row) in loaded:
            await unload(client=self.client, url=self.url, name=vllm_name(row))

    async def _count(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            names = await loaded_names(client=self.client, url=self.url, base_model=self.base_model)
            ADAPTERS_LOADED.labels(self.base_model).set(len(names))

    async def after_start(self) -> None:
        """The `VllmServer.on_start` callback: load the active adapters into a fresh server."""
        await self.sync(trigger="restart")

    async def on_event(self, message: dict[str, Any]) -> None:
        """Handle one `ADAPTER_CHANNEL` message `{"event": "ready"|"deleted", "model": "<ft name>"}`."""
        event, model_id = message.get("event"), message.get("model")
        row = await asyncio.to_thread(self._row, str(model_id)) if isinstance(model_id, str) else None
        if row is None or row.base_model != self.base_model:
            return
        async with self._lock:
            if event == "ready" and not row.deleted:
                await self._load(row, "ready")
            elif event == "deleted" or row.deleted:
                await self._unload(row)
            await self._count()

    async def listen(self, redis_url: str) -> None:
        """Follow `ADAPTER_CHANNEL` forever, reconnecting to Redis when the connection drops."""
        from redis import asyncio as aioredis
        from redis.exceptions import RedisError

        while True:
            client = aioredis.from_url(redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(ADAPTER_CHANNEL)
                    logger.info("vllm %s: listening on %s", self.base_model, ADAPTER_CHANNEL)
                    async for message in pubsub.listen():
                        await self._dispatch(message)
            except (RedisError, OSError) as exc:
                logger.warning("vllm %s: Redis subscription lost (%s); reconnecting", self.base_model, exc)
                await asyncio.sleep(2.0)
            finally:
                await client.aclose()

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        try:
            payload = json.loads(message["data"])
        except (TypeError, ValueError):
            logger.warning("vllm %s: ignored a malformed adapter message", self.base_model)
            return
        if not isinstance(payload, dict):
            return
        try:
            await self.on_event(payload)
        except Exception:
            logger.exception("vllm %s: adapter event %s failed", self.base_model, payload)

    async def sweep_forever(self) -> None:
        """Run `sync()` every `sweep_seconds`."""
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                await self.sync()
            except Exception:
                logger.exception("vllm %s: adapter sweep failed", self.base_model)

    async def run(self, redis_url: str) -> None:
        """Listen for adapter events and sweep the database, until cancelled."""
        await asyncio.gather(self.listen(redis_url), self.sweep_forever())
