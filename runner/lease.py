"""Job leases: which worker trains a job, as a compare-and-set on `JobRow.lease_owner` / `lease_expires_at`.

A worker takes the lease of a `queued` job (or of a `running` job whose lease expired: its worker died) and
renews it while it trains. Only the owner renews or releases it, so a worker that lost its lease (a long pause
of the process, a network split) notices and stops instead of training next to its successor.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import and_, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.job_status import JobStatus
from core.tables import JobRow

logger = logging.getLogger(__name__)


def acquire(engine: Engine, job_id: str, *, owner: str, seconds: float) -> JobRow | None:
    """Take the lease of job `job_id` and count a training attempt.

    Args:
        engine: the database.
        job_id: the job.
        owner: a unique name of this attempt (worker host, pid, random part).
        seconds: lease length.

    Returns:
        The job row with the lease held, or None when the job is not trainable now (another worker holds it,
        or it is not queued / running with an expired lease).
    """
    now = time.time()
    free = or_(col(JobRow.lease_owner).is_(None), col(JobRow.lease_expires_at) < now)
    trainable = col(JobRow.status).in_([JobStatus.queued.value, JobStatus.running.value])
    with Session(engine, expire_on_commit=False) as session:
        result = session.execute(
            update(JobRow)
            .where(and_(JobRow.id == job_id, trainable, free))  # type: ignore[arg-type]
            .values(lease_owner=owner, lease_expires_at=now + seconds, attempts=JobRow.attempts + 1)
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).one()
    logger.info("job %s: lease taken by %s (attempt %d)", job_id, owner, job.attempts)
    return job


def renew(engine: Engine, job_id: str, *, owner: str, seconds: float) -> bool:
    """Extend the lease; False when `owner` no longer holds it."""
    with Session(engine) as session:
        result = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.lease_owner == owner)  # type: ignore[arg-type]
            .values(lease_expires_at=time.time() + seconds)
        )
        session.commit()
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release(engine: Engine, job_id: str, *, owner: str, clean: bool = False) -> None:
    """Give the lease up. `clean`: the attempt ended on purpose (pause, finish), so it is not a crash and the
    crash counter `attempts` starts again from zero."""
    values: dict = {"lease_owner": None, "lease_expires_at": None}
    if clean:
        values["attempts"] = 0
    with Session(engine) as session:
        session.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner).values(**values)  # type: ignore[arg-type]
        )
        session.commit()
    logger.info("job %s: lease released by %s", job_id, owner)


def take_expired(engine: Engine, job_id: str, *, previous_owner: str | None) -> bool:
    """Clear an expired lease of a running job (the reconciler); False when it was renewed or taken meanwhile."""
    with Session(engine) as session:
        result = session.execute(
            update(JobRow)
            .where(
                JobRow.id == job_id,  # type: ignore[arg-type]
                JobRow.status == JobStatus.running.value,  # type: ignore[arg-type]
                or_(col(JobRow.lease_owner).is_(None), col(JobRow.lease_owner) == previous_owner),
                or_(col(JobRow.lease_expires_at).is_(None), col(JobRow.lease_expires_at) < time.time()),
            )
            .values(lease_owner=None, lease_expires_at=None)
        )
        session.commit()
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def owner_of(engine: Engine, job_id: str) -> tuple[str | None, str | None]:
    """(status, lease owner) of the job, read fresh."""
    with Session(engine) as session:
        row = session.exec(select(JobRow.status, JobRow.lease_owner).where(JobRow.id == job_id)).first()
        return (row[0], row[1]) if row else (None, None)
