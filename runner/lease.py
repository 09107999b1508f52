"""Job leases: which worker trains a job, as a compare-and-set on `JobRow.lease_owner` / `lease_expires_at`.

A worker takes the lease of a `queued` job (or of a `running` job whose lease expired: its worker died) and
renews it while it trains. Only the owner renews or releases it, so a worker that lost its lease (a long pause
of the process, a network split) notices and stops instead of training next to its successor.

Noticing is not enough: a worker blocked for longer than the lease may still be about to write. So every
durable write of an attempt is fenced by its `Lease` (owner and epoch): database writes check it in the same
transaction (`fenced_session`, or `transition(where=lease.columns)`), store writes just before the switch
(`ArtifactStore.put_dir(fence=...)`). A successor's writes are then the only ones that land.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.job_status import JobStatus
from core.storage import Fence
from core.tables import JobRow

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """A fenced write was refused: another attempt holds the job's lease now."""

    def __init__(self, job_id: str, owner: str) -> None:
        super().__init__(f"job {job_id}: {owner} no longer holds the lease")
        self.job_id, self.owner = job_id, owner


@dataclass(frozen=True)
class Lease:
    """One attempt's hold on a job: owner and epoch, the fencing token its writes are checked against."""

    job_id: str
    owner: str
    epoch: int

    @classmethod
    def of(cls, job: JobRow) -> Lease:
        """The lease `acquire` just took on `job`."""
        assert job.lease_owner is not None
        return cls(job.id, job.lease_owner, job.lease_epoch)

    @property
    def columns(self) -> dict[str, Any]:
        """The columns that hold the lease, for `transition(where=...)`."""
        return {"lease_owner": self.owner, "lease_epoch": self.epoch}

    def fence(self, engine: Engine) -> Fence:
        """A store fence: True while this lease is held."""
        return lambda: holds(engine, self)


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
            .values(
                lease_owner=owner,
                lease_expires_at=now + seconds,
                attempts=JobRow.attempts + 1,
                lease_epoch=JobRow.lease_epoch + 1,
            )
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).one()
    logger.info("job %s: lease taken by %s (attempt %d)", job_id, owner, job.attempts)
    return job


def holds(engine: Engine, lease: Lease) -> bool:
    """True when `lease` is still the job's lease."""
    with Session(engine) as session:
        row = session.exec(
            select(JobRow.pk).where(JobRow.id == lease.job_id, *_held(lease))  # type: ignore[arg-type]
        ).first()
        return row is not None


@contextmanager
def fenced_session(engine: Engine, lease: Lease) -> Iterator[Session]:
    """A session whose writes commit only while `lease` is held: it first locks the job row by a write that
    matches only the lease holder, so a successor's acquire waits for this commit or wins before it.

    Raises:
        LeaseLost: another attempt holds the lease (nothing is written).
    """
    with Session(engine, expire_on_commit=False) as session:
        result = session.execute(
            update(JobRow).where(JobRow.id == lease.job_id, *_held(lease)).values(lease_owner=lease.owner)  # type: ignore[arg-type]
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise LeaseLost(lease.job_id, lease.owner)
        yield session
        session.commit()


def mark_progress(engine: Engine, lease: Lease) -> None:
    """The attempt saved resume state past where it started: it does not count against `job_max_attempts`
    (the counter is of consecutive attempts without progress).

    Raises:
        LeaseLost: another attempt holds the lease.
    """
    with fenced_session(engine, lease) as session:
        session.execute(update(JobRow).where(JobRow.id == lease.job_id).values(attempts=0))  # type: ignore[arg-type]


def _held(lease: Lease) -> list[Any]:
    return [JobRow.lease_owner == lease.owner, JobRow.lease_epoch == lease.epoch]


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
