"""`tuneworks serve`: one supervised vLLM server per base model, with its adapters kept in step with the database.

For each id in `FT_BASE_MODELS`: prepare the weights, start a `VllmServer`, and run a `ServedAdapters` that
follows adapter events on Redis, sweeps the database and reloads adapters after each vLLM restart. SIGTERM or
SIGINT stops every server's process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import httpx
from sqlalchemy.engine import Engine

from core.db import init_db, make_engine
from core.settings import Settings
from core.storage import ArtifactStore
from core.weights import ensure_prepared
from serving.adapters import ServedAdapters
from serving.engine import VllmServer

logger = logging.getLogger(__name__)


def run_serve(settings: Settings) -> int:
    """Run the inference supervisor until SIGTERM/SIGINT. Returns the process exit code."""
    if settings.serve_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.serve_metrics_port, addr=settings.metrics_host)
        logger.info("serve: metrics on port %s", settings.serve_metrics_port)
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    store = ArtifactStore(settings.artifacts_dir)
    servers: list[VllmServer] = []
    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(timeout=60.0, headers=settings.vllm_headers()) as client:
        for base in settings.base_model_ids:
            if settings.vllm_url(base) is None:
                continue
            server, adapters = _pair(settings, engine=engine, store=store, base=base, client=client)
            servers.append(server)
            tasks += [
                asyncio.create_task(server.run()),
                asyncio.create_task(adapters.run(settings.resolved_redis_url)),
            ]
        logger.info("serve: supervising %s vLLM server(s)", len(servers))
        await _until(stop, tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
    engine.dispose()
    logger.info("serve: stopped")
    return 0


def _pair(
    settings: Settings, *, engine: Engine, store: ArtifactStore, base: str, client: httpx.AsyncClient
) -> tuple[VllmServer, ServedAdapters]:
    model = ensure_prepared(settings, base)
    url = settings.vllm_url(base)
    assert url is not None
    adapters = ServedAdapters(
        settings=settings, engine=engine, store=store, base_model=base, url=url, client=client
    )
    return VllmServer(settings=settings, model=model, on_start=adapters.after_start), adapters


async def _until(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Wait for the stop signal; a task that ends early (a bug) is logged and stops the process."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiter and not task.cancelled() and task.exception() is not None:
            logger.error("serve: a supervisor task failed", exc_info=task.exception())
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
