"""The one module that changes a job's status.

`transition()` checks the move against the table, writes the new status, the other fields and a job event in
one transaction with a compare-and-set on the old status (so an API cancel and a worker finishing at the same
moment cannot both win), and only after the commit announces it (log line and metric). Callers that enqueue
work or publish do it after `transition()` returns, i.e. after the change is durable.

A change that goes with other rows (a job succeeding and its model row) passes them through `also`, so they
commit with the status or not at all; a worker adds its lease to the compare-and-set with `where`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.ids import new_id, now
from core.tables import JobEventRow, JobRow

logger = logging.getLogger(__name__)


class JobStatus(StrEnum):
    validating_files = "validating_files"  # created; the worker is checking the training/validation files
    queued = "queued"  # waiting for a worker (also after resume and after a worker crash)
    running = "running"  # a worker holds the lease and trains
    paused = "paused"  # stopped at a step boundary with resume state saved; `resume` queues it again
    succeeded = "succeeded"  # adapter saved and registered; `fine_tuned_model` set
    failed = "failed"  # `error` set
    cancelled = "cancelled"  # stopped on request; checkpoints kept


S = JobStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.validating_files: frozenset({S.queued, S.failed, S.cancelled}),
    S.queued: frozenset({S.running, S.paused, S.failed, S.cancelled}),
    # running -> queued: the worker's lease expired (crash) and the job goes back to the queue.
    S.running: frozenset({S.succeeded, S.failed, S.cancelled, S.paused, S.queued}),
    S.paused: frozenset({S.queued, S.cancelled}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


class IllegalTransition(Exception):
    """The job is not in a state from which the requested move is allowed (or another writer moved it first)."""

    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id}: cannot move from {current} to {target}")
        self.job_id = job_id
        self.current = current
        self.target = target


def can_move(current: str, target: str) -> bool:
    return JobStatus(target) in TRANSITIONS[JobStatus(current)]


def transition(
    engine: Engine,
    job_id: str,
    target: JobStatus,
    *,
    message: str,
    level: str = "info",
    expect: JobStatus | set[JobStatus] | None = None,
    data: dict[str, Any] | None = None,
    where: dict[str, Any] | None = None,
    also: Callable[[Session], None] | None = None,
    **fields: Any,
) -> JobRow:
    """Move job `job_id` to `target`, with `fields` set on the row and an event with `message`.

    Args:
        engine: the database.
        job_id: the job.
        target: the new status.
        message: text of the job event written with the change.
        level: event level (info, warn, error).
        expect: the status(es) the caller believes the job is in; the move fails if it is elsewhere.
        data: optional event data.
        where: other columns the compare-and-set checks, name -> value (a worker's `lease_owner` and
            `lease_epoch`); the move fails when one differs.
        also: called with the session after the compare-and-set and before the status event; the rows it adds
            commit with the change, or not at all (it raising rolls the change back).
        **fields: other columns to set in the same write (error, finished_at, fine_tuned_model, ...).

    Returns:
        The job row after the change.

    Raises:
        IllegalTransition: the move is not allowed from the current status, the status changed meanwhile, or a
            `where` column differs.
        KeyError: no such job.
    """
    with Session(engine, expire_on_commit=False) as session:
        job = _load(session, job_id)
        current = JobStatus(job.status)
        allowed = {expect} if isinstance(expect, JobStatus) else expect
        if (allowed is not None and current not in allowed) or not can_move(current, target):
            raise IllegalTransition(job_id, current, target)
        if target in TERMINAL:
            fields.setdefault("finished_at", now())
        values = {"status": target.value, **fields}
        checks = [JobRow.id == job_id, JobRow.status == current.value]
        checks += [getattr(JobRow, name) == value for name, value in (where or {}).items()]
        result = session.execute(update(JobRow).where(*checks).values(**values))  # type: ignore[arg-type]
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise IllegalTransition(job_id, current, target)
        if also is not None:
            also(session)
        session.add(job_event(job_id, message, level=level, data=data))
        session.commit()
        session.refresh(job)
    _announce(job, current, target)
    return job


def add_event(
    engine: Engine,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    """Append one event to a job (no status change)."""
    with Session(engine) as session:
        session.add(job_event(job_id, message, level=level, type=type, data=data))
        session.commit()


def job_event(
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEventRow:
    """A new event row, for a caller to add in its own transaction (`transition(also=...)`)."""
    return JobEventRow(
        id=new_id("ftevent-"), job_id=job_id, message=message, level=level, type=type, data=data
    )


def _load(session: Session, job_id: str) -> JobRow:
    from sqlmodel import select

    job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
    if job is None:
        raise KeyError(job_id)
    return job


def _announce(job: JobRow, old: JobStatus, new: JobStatus) -> None:
    from core import metrics

    logger.info("job %s: %s -> %s", job.id, old, new)
    metrics.JOB_TRANSITIONS.labels(base_model=job.model, status=new.value).inc()
    if new in TERMINAL:
        seconds = max(0, (job.finished_at or now()) - job.created_at)
        metrics.JOB_DURATION.labels(base_model=job.model, status=new.value).observe(seconds)
    if new == JobStatus.failed:
        code = (job.error or {}).get("code") or "unknown"
        metrics.JOB_FAILURES.labels(base_model=job.model, code=str(code)).inc()
