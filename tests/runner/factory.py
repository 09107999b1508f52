"""Rows for worker tests: a project, uploaded files in the store and a job in `validating_files`, as the API
would have created them; plus a burst worker run in-process."""

from __future__ import annotations

import asyncio
from typing import Any

from arq.worker import Worker
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.base_models import TINY
from core.db import init_db, make_engine
from core.ids import new_id
from core.queue import ADAPTER_CHANNEL, VALIDATE_JOB, AdapterEvent, connect, enqueue
from core.settings import Settings
from core.storage import ArtifactStore
from core.store_keys import file_key
from core.tables import FileRow, JobEventRow, JobRow, Project
from runner.worker import worker_settings


class Factory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(settings.resolved_database_url)
        init_db(self.engine)
        self.store = ArtifactStore(settings.artifacts_dir)
        self.project = Project(id=new_id("proj_"), name="proj-x")
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(self.project)
            session.commit()

    def file(self, data: bytes, *, purpose: str = "fine-tune") -> str:
        file_id = new_id("file-")
        self.store.write_bytes(file_key(file_id), data)
        row = FileRow(id=file_id, project_id=self.project.id, bytes=len(data), filename="train.jsonl",
                      purpose=purpose, status="processed", storage_key=file_key(file_id))  # fmt: skip
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
        return file_id

    def job(self, training: bytes, *, validation: bytes | None = None, hyperparameters: dict | None = None,
            model: str = TINY, suffix: str | None = None, **fields: Any) -> str:  # fmt: skip
        job_id = new_id("ftjob-")
        hp = hyperparameters or {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": "auto"}
        row = JobRow(
            id=job_id, project_id=self.project.id, model=model, status=fields.pop("status", "validating_files"),
            training_file=self.file(training), validation_file=self.file(validation) if validation else None,
            hyperparameters=dict(hp), method={"type": "supervised", "supervised": {"hyperparameters": dict(hp)}},
            seed=fields.pop("seed", 11), suffix=suffix, **fields,
        )  # fmt: skip
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
        return job_id

    def row(self, job_id: str) -> JobRow:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.exec(select(JobRow).where(JobRow.id == job_id)).one()

    def events(self, job_id: str) -> list[JobEventRow]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.pk)
            ).all()  # type: ignore[arg-type]
            return list(rows)

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.events(job_id) if e.type != "metrics"]

    async def enqueue(self, job_id: str, function: str = VALIDATE_JOB) -> None:
        redis = await connect(self.settings.resolved_redis_url)
        try:
            await enqueue(
                self.engine, redis, function=function, job_id=job_id, queue_name=self.settings.queue_name
            )
        finally:
            await redis.close()


async def run_burst(settings: Settings) -> None:
    """Run the worker until its queue is empty (in this process)."""
    worker = Worker(**worker_settings(settings, burst=True))
    try:
        await worker.main()
    finally:
        await worker.close()


def burst(settings: Settings) -> None:
    asyncio.run(run_burst(settings))


async def run_burst_listening(settings: Settings) -> list[AdapterEvent]:
    """Run the worker until its queue is empty; returns the adapter events it published meanwhile."""
    redis = await connect(settings.resolved_redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(ADAPTER_CHANNEL)
    await pubsub.get_message(timeout=5)  # the subscription's confirmation: from here on nothing is missed
    try:
        await run_burst(settings)
        events: list[AdapterEvent] = []
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
            event = AdapterEvent.decode(message["data"])
            if event is not None:
                events.append(event)
        return events
    finally:
        await pubsub.aclose()
        await redis.aclose()
