"""The contract between the API and the workers on Redis: arq function names, job ids, pub/sub channel.

The database is the truth and Redis only delivers: a job row is committed first, then `enqueue()` records a
fresh token on the row and pushes an arq job with that token as its id. The reconciler (in the worker) finds
`validating_files`/`queued` jobs whose token is no longer in Redis and enqueues them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from service.ids import new_id
from service.tables import JobRow

logger = logging.getLogger(__name__)

VALIDATE_JOB = "validate_job"  # arq function: validate a job's files, then queue it for training
TRAIN_JOB = "train_job"  # arq function: train (or resume) a job
ADAPTER_CHANNEL = "tuneworks:adapters"  # pub/sub: {"event": "ready"|"deleted", "model": name}


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


async def connect(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


async def enqueue(engine: Engine, redis: ArqRedis, *, function: str, job_id: str, queue_name: str) -> str:
    """Record a new queue token on job `job_id`, then push the arq job. Returns the token."""
    token = new_id(f"{function}:{job_id}:", 8)
    # In a thread: a blocking database write on the event loop stalls every request in flight (and, with the
    # connection pool exhausted by handlers that need the loop to finish, deadlocks until the pool timeout).
    await asyncio.to_thread(_record_token, engine, job_id, token)
    await redis.enqueue_job(function, job_id, _job_id=token, _queue_name=queue_name)
    logger.info("job %s: enqueued %s", job_id, function)
    return token


def _record_token(engine: Engine, job_id: str, token: str) -> None:
    with Session(engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(queue_token=token))  # type: ignore[arg-type]
        session.commit()


async def publish_adapter_event(redis: Any, event: str, model: str) -> None:
    """Tell the serve processes that adapter `model` became servable (`ready`) or was `deleted`."""
    await redis.publish(ADAPTER_CHANNEL, json.dumps({"event": event, "model": model}))
