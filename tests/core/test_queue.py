"""The queue contract on Redis: queue jobs are JSON, never pickle; pub/sub messages are typed and checked."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from arq.connections import create_pool
from arq.worker import Worker, func

from core import queue
from core.settings import Settings
from runner.worker import worker_settings


def test_a_queue_job_round_trips_as_json_and_pickle_is_refused() -> None:
    job = {"t": 1, "f": queue.VALIDATE_JOB, "a": ["ftjob-x"], "k": {}, "et": 1}
    assert queue.job_deserializer(queue.job_serializer(job)) == job
    with pytest.raises(ValueError):
        queue.job_deserializer(pickle.dumps(job))


@pytest.mark.parametrize(
    ("message_type", "raw"),
    [
        (queue.AdapterEvent, b"not json"),
        (queue.AdapterEvent, b'{"event": "loaded", "model": "ft:x"}'),
        (queue.AdapterEvent, b'{"event": "ready", "model": "ft:x", "path": "/etc"}'),
        (queue.LoadRequest, b'{"model": "ft:x", "base_model": "b"}'),
        (queue.LoadReply, b"[]"),
    ],
)
def test_malformed_messages_decode_to_none(message_type: type[queue.Message], raw: bytes) -> None:
    assert message_type.decode(raw) is None


def test_messages_round_trip() -> None:
    event = queue.AdapterEvent(event="ready", model="ft:a:b::c")
    assert queue.AdapterEvent.decode(event.encode()) == event


def test_the_worker_never_unpickles_a_job_from_redis(settings: Settings) -> None:
    """A pickled job (what any pod that reaches Redis could push) is not run; a JSON job of ours is."""
    calls: list[str] = []

    async def recorder(ctx: dict, job_id: str) -> None:
        calls.append(job_id)

    async def scenario() -> None:
        redis_settings = queue.redis_settings(settings.resolved_redis_url)
        pickled = await create_pool(redis_settings)  # arq's default serializer: pickle
        await pickled.enqueue_job(queue.VALIDATE_JOB, "pickled", _queue_name=settings.queue_name)
        await pickled.aclose()
        ours = await queue.connect(settings.resolved_redis_url)
        await ours.enqueue_job(queue.VALIDATE_JOB, "json", _queue_name=settings.queue_name)
        await ours.aclose()
        options = worker_settings(settings, burst=True) | {
            "functions": [func(recorder, name=queue.VALIDATE_JOB)]
        }
        worker = Worker(**options)
        try:
            await worker.main()
        finally:
            await worker.close()

    asyncio.run(scenario())
    assert calls == ["json"]
