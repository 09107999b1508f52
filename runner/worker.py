"""`tuneworks worker`: the arq worker that validates files and trains adapters.

Functions VALIDATE_JOB and TRAIN_JOB (core.queue) take a job id only, have explicit timeouts and tries, and
keep no result in Redis (the database holds the outcome). A reconciler pass runs at start-up and then every
`reconcile_seconds`. `worker_settings()` builds the arq configuration, so tests run the same worker in-process
with `burst=True`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.worker import Worker, func

from core.db import init_db, make_engine
from core.queue import TRAIN_JOB, VALIDATE_JOB, job_deserializer, job_serializer, redis_settings
from core.settings import Settings
from core.storage import ArtifactStore
from runner.reconciler import reconcile, run_periodically
from runner.training_job import train_job
from runner.validation_job import validate_job

logger = logging.getLogger(__name__)

VALIDATE_TIMEOUT_SECONDS = 900  # tokenizing a large file; short, so that a crashed validation is retried soon
TRAIN_MAX_TRIES = 100  # arq re-runs (shutdown, busy lease); crashes are bounded by `job_max_attempts` instead


def worker_settings(settings: Settings, *, burst: bool = False) -> dict[str, Any]:
    """Keyword arguments of `arq.worker.Worker` for this service.

    Args:
        settings: the process settings (queue name, Redis, timeouts, concurrency).
        burst: stop when the queue is empty (tests).

    Returns:
        The arguments: `Worker(**worker_settings(settings))`.
    """

    async def on_startup(ctx: dict[str, Any]) -> None:
        engine = make_engine(settings.resolved_database_url)
        init_db(engine)
        ctx.update(
            settings=settings, engine=engine, store=ArtifactStore(settings.artifacts_dir), callbacks={}
        )
        await reconcile(ctx)
        ctx["reconciler"] = asyncio.create_task(run_periodically(ctx, settings.reconcile_seconds))

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        task = ctx.get("reconciler")
        if task is not None:
            task.cancel()
        if "engine" in ctx:
            ctx["engine"].dispose()

    return {
        "functions": [
            func(
                validate_job, name=VALIDATE_JOB, timeout=VALIDATE_TIMEOUT_SECONDS, max_tries=3, keep_result=0
            ),
            func(
                train_job,
                name=TRAIN_JOB,
                timeout=settings.job_timeout_seconds,
                max_tries=TRAIN_MAX_TRIES,
                keep_result=0,
            ),  # fmt: skip
        ],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings.resolved_redis_url),
        "job_serializer": job_serializer,  # JSON: a job from Redis is data, never code (no pickle)
        "job_deserializer": job_deserializer,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "max_jobs": settings.worker_concurrency,
        "job_timeout": settings.job_timeout_seconds,
        "keep_result": 0,
        "max_tries": TRAIN_MAX_TRIES,
        "poll_delay": 0.5,
        "burst": burst,
        "handle_signals": not burst,
    }


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGINT/SIGTERM; serves Prometheus metrics on `worker_metrics_port` (0 = off).

    Returns:
        The process exit code.
    """
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.metrics_host)
        logger.info("worker metrics on port %d", settings.worker_metrics_port)
    Worker(**worker_settings(settings)).run()
    return 0
