"""The life cycle of fine-tuned adapters in one base model's vLLM server, owned by the serve process.

The database (`ModelRow`) says which adapters exist; the artifact store holds their PEFT folders. Loading one
means materialising it on this process's own disk (`serving.materialise`) and registering that folder with vLLM
(`serving.vllm_client`): nothing else may do either, because the folder must be on the disk of the vLLM server
that reads it (in Kubernetes the API runs in another pod with its own FT_HOME).

`ServedAdapters` keeps one server in step with the database. It follows two Redis channels: `ADAPTER_CHANNEL`
(`AdapterEvent`: a model became `ready` or was `deleted`) and `LOAD_CHANNEL` (`LoadRequest`: the gateway met a
404 from vLLM for a live model and waits for a `LoadReply`). It also sweeps the database every `SWEEP_SECONDS` as
a safety net, and loads the active adapters again after a vLLM restart.

Locking: every operation on one adapter holds that adapter's lock and re-reads its row, so a load of adapter A
never waits for a load of adapter B, and the last word is always the database's. A sweep holds a whole-server
lock only against another sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Literal

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.metrics import ADAPTER_LOADS, ADAPTERS_LOADED
from core.queue import ADAPTER_CHANNEL, LOAD_CHANNEL, AdapterEvent, LoadRequest, answer_load
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import ModelRow
from serving.materialise import materialise, on_disk, remove, remove_name, vllm_name
from serving.vllm_client import load, loaded_names, unload

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 15.0
REDIS_RETRY_SECONDS = 2.0

Action = Literal["load", "materialise", "unload"]


async def ensure_loaded(
    *,
    settings: Settings,
    store: ArtifactStore,
    row: ModelRow,
    client: httpx.AsyncClient,
    url: str,
    trigger: str,
) -> bool:
    """Materialise `row`'s adapter on this process's disk and load it into the server at `url`.

    Args:
        settings: the serve process's settings.
        store: the artifact store holding the adapter.
        row: the fine-tuned model.
        client: the HTTP client to vLLM.
        url: the vLLM server of `row.base_model`.
        trigger: why it is loaded (a metric label).

    Returns:
        True when the adapter is loaded; failures are logged and counted, never raised.
    """
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
        self._sweep_lock = asyncio.Lock()
        # One lock per adapter name, kept for the life of the process: bounded by this base model's adapters.
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # event and load-request handlers in flight

    # --- the database --------------------------------------------------------------------------------------
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

    async def _own_row(self, model_id: str) -> ModelRow | None:
        """Model `model_id` when it is one of this base model's (deleted or not), else None."""
        row = await asyncio.to_thread(self._row, model_id)
        return row if row is not None and row.base_model == self.base_model else None

    # --- one adapter -----------------------------------------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _apply(self, row: ModelRow, action: Action, trigger: str) -> bool:
        """Do `action` to `row`'s adapter under its own lock; a row deleted meanwhile is unloaded instead.

        Returns:
            True when the adapter is loaded afterwards.
        """
        name = vllm_name(row)  # made of the job id and step, which never change: safe before the re-read
        async with self._lock(name):
            fresh = await asyncio.to_thread(self._row, row.id)
            if fresh is None or fresh.deleted or action == "unload":
                # The folder goes first, so that no request makes vLLM load it again on demand.
                await asyncio.to_thread(remove, settings=self.settings, row=row)
                await unload(client=self.client, url=self.url, name=name)
                return False
            if action == "materialise":
                await self._materialise(fresh)
                return False
            return await ensure_loaded(
                settings=self.settings,
                store=self.store,
                row=fresh,
                client=self.client,
                url=self.url,
                trigger=trigger,
            )

    async def _materialise(self, row: ModelRow) -> None:
        try:
            await asyncio.to_thread(materialise, settings=self.settings, store=self.store, row=row)
        except (OSError, ValueError) as exc:
            logger.error("model %s: cannot materialise adapter: %s", row.id, exc)

    async def _forget(self, name: str) -> None:
        """Remove and unload adapter `name`, which has no model row at all."""
        async with self._lock(name):
            await asyncio.to_thread(
                remove_name, settings=self.settings, base_model=self.base_model, name=name
            )
            await unload(client=self.client, url=self.url, name=name)

    async def _count(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            names = await loaded_names(client=self.client, url=self.url, base_model=self.base_model)
            ADAPTERS_LOADED.labels(self.base_model).set(len(names))

    # --- the sweep -------------------------------------------------------------------------------------------
    async def sync(self, trigger: str = "sweep") -> None:
        """Materialise every live adapter, load the newest ones (up to `--max-cpu-loras`), drop deleted ones.

        Args:
            trigger: why (`sweep` or `restart`; a metric label of the loads).
        """
        async with self._sweep_lock:
            try:
                loaded = await loaded_names(client=self.client, url=self.url, base_model=self.base_model)
            except httpx.HTTPError as exc:
                logger.info("vllm %s: not reachable for the adapter sweep: %s", self.base_model, exc)
                return
            folders = await asyncio.to_thread(on_disk, settings=self.settings, base_model=self.base_model)
            # The database is listed after vLLM and the disk: an adapter found there had its row committed
            # before it was loaded or materialised, so a name without a row in this listing really has none.
            rows = await asyncio.to_thread(self._rows)
            await self._drop(rows, loaded | folders)
            await self._fill(rows, loaded, trigger)
            await self._count()

    async def _drop(self, rows: list[ModelRow], present: set[str]) -> None:
        """Unload and remove the adapters in `present` whose model is deleted or unknown."""
        known = {vllm_name(row): row for row in rows}
        for name in sorted(present - known.keys()):
            await self._forget(name)
        for name in sorted(present & known.keys()):
            if known[name].deleted:
                await self._apply(known[name], "unload", "sweep")

    async def _fill(self, rows: list[ModelRow], loaded: set[str], trigger: str) -> None:
        """Load the newest live adapters that vLLM lacks, and materialise the rest for on-demand loading."""
        limit = max(self.settings.vllm_max_cpu_loras, 1)
        for index, row in enumerate(r for r in rows if not r.deleted):
            if vllm_name(row) not in loaded:
                await self._apply(row, "load" if index < limit else "materialise", trigger)

    async def after_start(self) -> None:
        """The `VllmServer.on_start` callback: load the active adapters into a fresh server."""
        await self.sync(trigger="restart")

    async def sweep_forever(self) -> None:
        """Run `sync()` every `sweep_seconds`."""
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                await self.sync()
            except Exception:
                logger.exception("vllm %s: adapter sweep failed", self.base_model)

    # --- messages --------------------------------------------------------------------------------------------
    async def on_event(self, event: AdapterEvent) -> None:
        """Handle one `ADAPTER_CHANNEL` message: load a `ready` adapter, unload a `deleted` one.

        Args:
            event: the message; one for another base model's adapter is ignored.
        """
        row = await self._own_row(event.model)
        if row is None:
            return
        await self._apply(row, "load" if event.event == "ready" else "unload", event.event)
        await self._count()

    async def on_load_request(self, request: LoadRequest, redis: Any) -> None:
        """Handle one `LOAD_CHANNEL` message: load the adapter on this process's disk and vLLM, then answer.

        Args:
            request: the gateway's request; one for another base model is ignored (its serve process answers).
            redis: the client to answer on (`request.reply_to`).
        """
        if request.base_model != self.base_model:
            return
        try:
            loaded, detail = await self._load_on_demand(request.model)
        except Exception:  # the gateway waits for an answer: a failure must still send one
            logger.exception("model %s: on-demand load failed", request.model)
            loaded, detail = False, "the serve process failed; see its log"
        await answer_load(redis, request, loaded=loaded, detail=detail)
        await self._count()

    async def _load_on_demand(self, model_id: str) -> tuple[bool, str]:
        row = await self._own_row(model_id)
        if row is None or row.deleted:
            return False, "no such live fine-tuned model"
        logger.info("model %s: unknown to vLLM; loading on demand", row.id)
        if await self._apply(row, "load", "on_demand"):
            return True, ""
        return False, "the adapter could not be loaded; see the serve process's log"

    async def listen(self, redis_url: str) -> None:
        """Follow `ADAPTER_CHANNEL` and `LOAD_CHANNEL` forever, reconnecting when the connection drops.

        Args:
            redis_url: the Redis that the API and the worker publish on.
        """
        from redis import asyncio as aioredis
        from redis.exceptions import RedisError

        client = aioredis.from_url(redis_url)
        try:
            while True:
                try:
                    await self._follow(client)
                except (RedisError, OSError) as exc:
                    logger.warning(
                        "vllm %s: Redis subscription lost (%s); reconnecting", self.base_model, exc
                    )
                    await asyncio.sleep(REDIS_RETRY_SECONDS)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await client.aclose()

    async def _follow(self, client: Any) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(ADAPTER_CHANNEL, LOAD_CHANNEL)
            logger.info("vllm %s: listening on %s and %s", self.base_model, ADAPTER_CHANNEL, LOAD_CHANNEL)
            async for message in pubsub.listen():
                self._dispatch(client, message)

    def _dispatch(self, redis: Any, message: dict[str, Any]) -> None:
        """Decode one pub/sub message and handle it in a task of its own, so the listener never waits."""
        if message.get("type") != "message":
            return
        channel, data = _text(message.get("channel")), message.get("data") or b""
        if channel == ADAPTER_CHANNEL:
            event = AdapterEvent.decode(data)
            if event is not None:
                self._spawn(self.on_event(event), f"adapter event {event.event} {event.model}")
        elif channel == LOAD_CHANNEL:
            request = LoadRequest.decode(data)
            if request is not None and request.base_model == self.base_model:
                self._spawn(self.on_load_request(request, redis), f"load request {request.model}")

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(self._guarded(work, what))
        self._tasks.add(task)  # a reference, or the task may be garbage-collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await work
        except Exception:
            logger.exception("vllm %s: %s failed", self.base_model, what)

    async def run(self, redis_url: str) -> None:
        """Listen for adapter events and load requests and sweep the database, until cancelled.

        Args:
            redis_url: the Redis that the API and the worker publish on.
        """
        await asyncio.gather(self.listen(redis_url), self.sweep_forever())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
