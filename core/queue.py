"""The contract between the processes on Redis: arq function names, queue tokens, and typed pub/sub messages.

The database is the truth and Redis only delivers: a job row is committed first, then `enqueue()` records a
fresh token on the row and pushes an arq job with that token as its id (queue jobs take ids only). The
reconciler (in the worker) finds `validating_files`/`queued` jobs whose token is no longer in Redis and enqueues
them again.

Pub/sub messages are pydantic models serialised as JSON, never pickled:
- `AdapterEvent` on `ADAPTER_CHANNEL`: the worker or the API tells the serve processes that a model became
  servable (`ready`) or was `deleted`.
- `LoadRequest` on `LOAD_CHANNEL`: the gateway asks the serve process of a base model to load an adapter that
  vLLM did not know; the serve process answers with a `LoadReply` on the request's own `reply_to` channel once
  the adapter is loaded (or could not be).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal, Self

from arq.connections import ArqRedis, RedisSettings, create_pool
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.ids import new_id
from core.tables import JobRow

logger = logging.getLogger(__name__)

VALIDATE_JOB = "validate_job"  # arq function: validate a job's files, then queue it for training
TRAIN_JOB = "train_job"  # arq function: train (or resume) a job
ADAPTER_CHANNEL = "tuneworks:adapters"  # pub/sub: AdapterEvent
LOAD_CHANNEL = "tuneworks:adapter-load"  # pub/sub: LoadRequest (answered with a LoadReply on `reply_to`)
REPLY_PREFIX = "tuneworks:adapter-load:reply:"  # + a random id: the channel of one LoadReply


class Message(BaseModel):
    """A pub/sub message: JSON on the wire, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, raw: bytes | str) -> Self | None:
        """The message in `raw`, or None (logged) when it is not one of this type."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            logger.warning("ignored a malformed %s message: %s", cls.__name__, exc.errors()[:1])
            return None


class AdapterEvent(Message):
    event: Literal["ready", "deleted"]
    model: str  # the fine-tuned model name (`ft:...`)


class LoadRequest(Message):
    model: str  # the fine-tuned model name (`ft:...`) that vLLM answered 404 for
    base_model: str  # only the serve process of this base model answers
    reply_to: str  # the channel of the LoadReply


class LoadReply(Message):
    model: str
    loaded: bool
    detail: str = ""


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


async def connect(url: str, *, settings: RedisSettings | None = None) -> ArqRedis:
    """An arq pool that speaks the JSON job format (`job_serializer`), never pickle."""
    return await create_pool(
        settings or redis_settings(url), job_serializer=job_serializer, job_deserializer=job_deserializer
    )


def new_token(function: str, job_id: str) -> str:
    """A queue token (the arq job id) for pushing `function` of job `job_id`."""
    return new_id(f"{function}:{job_id}:", 8)


async def enqueue(
    engine: Engine, redis: ArqRedis, *, function: str, job_id: str, queue_name: str, token: str | None = None
) -> str:
    """Push the arq job `function` of job `job_id` under a queue token recorded on the job first. Returns it.

    `token` is one the caller already committed with the job (a new job gets its token in the same transaction
    that inserts it, which saves a write); without it a new one is recorded here. Recorded before pushed: when
    the push fails, the reconciler finds a token that is not in Redis and pushes the job again.
    """
    if token is None:
        token = new_token(function, job_id)
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


async def publish_adapter_event(redis: Any, event: Literal["ready", "deleted"], model: str) -> None:
    """Tell the serve processes that adapter `model` became servable (`ready`) or was `deleted`."""
    await redis.publish(ADAPTER_CHANNEL, AdapterEvent(event=event, model=model).encode())


async def request_load(redis: Any, *, model: str, base_model: str, timeout: float) -> LoadReply | None:
    """Ask the serve process of `base_model` to load `model`, and wait for its answer.

    Args:
        redis: a redis-py asyncio client (an arq pool is one).
        model: the fine-tuned model name.
        base_model: its base model.
        timeout: seconds to wait for the reply.

    Returns:
        The serve process's reply, or None when no serve process listens or none answered in time.
    """
    reply_to = new_id(REPLY_PREFIX, 16)
    request = LoadRequest(model=model, base_model=base_model, reply_to=reply_to)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(reply_to)  # before publishing, so the answer cannot be missed
        if not await redis.publish(LOAD_CHANNEL, request.encode()):
            logger.warning("model %s: no serve process listens on %s", model, LOAD_CHANNEL)
            return None
        try:
            return await asyncio.wait_for(_first_reply(pubsub), timeout)
        except TimeoutError:
            logger.warning("model %s: no load reply within %.0f s", model, timeout)
            return None


async def _first_reply(pubsub: Any) -> LoadReply | None:
    async for message in pubsub.listen():
        if message.get("type") == "message":
            reply = LoadReply.decode(message["data"])
            if reply is not None:
                return reply
    return None


async def answer_load(redis: Any, request: LoadRequest, *, loaded: bool, detail: str = "") -> None:
    """Send the serve process's answer to a `LoadRequest`."""
    await redis.publish(
        request.reply_to, LoadReply(model=request.model, loaded=loaded, detail=detail).encode()
    )


def job_serializer(value: dict[str, Any]) -> bytes:
    """arq's serializer for queue jobs: JSON (queue jobs take ids only), never pickle."""
    return json.dumps(value, separators=(",", ":")).encode()


def job_deserializer(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("a queue job must be a JSON object")
    return value
