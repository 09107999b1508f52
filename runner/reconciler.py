"""The reconciler: puts back on the queue what Redis lost and what a dead worker left behind.

The database is the truth. A `validating_files` or `queued` job whose arq job (its `queue_token`) is neither
waiting nor in progress in Redis is enqueued again; a `running` job whose lease expired (its worker died) goes
back to `queued` and is enqueued, and the next worker resumes it from its newest resume state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core import metrics
from core.job_status import IllegalTransition, JobStatus, transition
from core.queue import TRAIN_JOB, VALIDATE_JOB, enqueue
from core.tables import JobRow
from runner import lease

logger = logging.getLogger(__name__)


async def reconcile(ctx: dict[str, Any]) -> int:
    """One pass over the jobs; returns how many were enqueued again."""
    engine: Engine = ctx["engine"]
    redis = ctx["redis"]
    queue = ctx["settings"].queue_name
    count = 0
    for job in _jobs(engine, [JobStatus.validating_files, JobStatus.queued]):
        if job.queue_token and await _alive(redis, queue, job.queue_token):
            continue
        function = VALIDATE_JOB if job.status == JobStatus.validating_files else TRAIN_JOB
        await enqueue(engine, redis, function=function, job_id=job.id, queue_name=queue)
        metrics.JOBS_REQUEUED.labels(reason="lost").inc()
        logger.warning("job %s: %s was not in Redis; enqueued again", job.id, function)
        count += 1
    for job in _jobs(engine, [JobStatus.running]):
        if job.lease_expires_at is not None and job.lease_expires_at >= time.time():
            continue
        count += await _requeue_running(engine, redis, queue, job)
    return count


async def _requeue_running(engine: Engine, redis: Any, queue: str, job: JobRow) -> int:
    if not lease.take_expired(engine, job.id, previous_owner=job.lease_owner):
        return 0
    try:
        transition(engine, job.id, JobStatus.queued, message="Worker lost; resuming from the newest checkpoint",
                   level="warn", expect=JobStatus.running)  # fmt: skip
    except IllegalTransition:
        return 0
    if job.queue_token:
        await _drop(redis, queue, job.queue_token)  # the dead worker's arq job would block its slot for days
    await enqueue(engine, redis, function=TRAIN_JOB, job_id=job.id, queue_name=queue)
    metrics.JOBS_REQUEUED.labels(reason="lease_expired").inc()
    logger.warning("job %s: lease of %s expired; enqueued again", job.id, job.lease_owner)
    return 1


def _jobs(engine: Engine, statuses: list[JobStatus]) -> list[JobRow]:
    with Session(engine) as session:
        return list(session.exec(select(JobRow).where(JobRow.status.in_([s.value for s in statuses]))).all())  # type: ignore[attr-defined]


async def _alive(redis: Any, queue: str, token: str) -> bool:
    queued = await redis.zscore(queue, token)
    return queued is not None or bool(await redis.exists(in_progress_key_prefix + token))


async def _drop(redis: Any, queue: str, token: str) -> None:
    await redis.zrem(queue, token)
    await redis.delete(in_progress_key_prefix + token, job_key_prefix + token, retry_key_prefix + token)


async def run_periodically(ctx: dict[str, Any], seconds: float) -> None:
    """Reconcile every `seconds` until cancelled; errors are logged, never fatal."""
    while True:
        try:
            await reconcile(ctx)
        except Exception:  # noqa: BLE001  a failed pass is retried on the next tick
            logger.exception("reconciler pass failed")
        await asyncio.sleep(seconds)
