"""The hot read paths of `/v1/fine_tuning/jobs`: retrieve, list, events and checkpoints, as SQLAlchemy Core
queries on a plain connection (run by `Database.read`), answered with the same wire models as `service.jobs`.

Why not the ORM here: a job retrieve through an ORM session cost about 275 us of Python (session, identity map,
unit of work, attribute instrumentation) around a 10 us SQLite query; the same select on a Core connection costs
about 70 us. Statements are built once at import and take their values as bound parameters, so SQLAlchemy's
compiled cache serves every request. Writes stay in `service.jobs`, on sessions.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, String, Table, bindparam, cast, exists, func, select

from core.tables import CheckpointRow, JobEventRow, JobRow, ModelRow
from service import pagination
from service.errors import not_found
from service.jobs import JOB_ID_PARAM, checkpoint_to_openai, event_to_openai, to_openai
from service.protocol import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
)


def _table(model: Any) -> Table:
    return model.__table__


JOBS, EVENTS, CHECKPOINTS, MODELS = (
    _table(JobRow),
    _table(JobEventRow),
    _table(CheckpointRow),
    _table(ModelRow),
)
# Rows carry the ORM's attribute names, so `to_openai()` reads a Core row as it reads a `JobRow`.
_JOB_COLUMNS = [c.label("metadata_") if c.name == "metadata" else c for c in JOBS.c]
_JOB = select(*_JOB_COLUMNS).where(
    JOBS.c.id == bindparam("job_id"), JOBS.c.project_id == bindparam("project_id")
)
_JOB_EXISTS = select(JOBS.c.pk).where(
    JOBS.c.id == bindparam("job_id"), JOBS.c.project_id == bindparam("project_id")
)


def retrieve(*, connection: Connection, project_id: str, job_id: str) -> FineTuningJob:
    """The project's job `job_id`.

    Raises:
        NotFound: no such job in this project.
    """
    row = connection.execute(_JOB, {"job_id": job_id, "project_id": project_id}).first()
    if row is None:
        raise not_found("fine-tuning job", job_id, param=JOB_ID_PARAM)
    return to_openai(row)  # type: ignore[arg-type]  # a Core row with JobRow's attribute names


def _check_job(connection: Connection, project_id: str, job_id: str) -> None:
    if connection.execute(_JOB_EXISTS, {"job_id": job_id, "project_id": project_id}).first() is None:
        raise not_found("fine-tuning job", job_id, param=JOB_ID_PARAM)


_PAGE = JOBS.c.project_id == bindparam("project_id")
_NEWEST = select(*_JOB_COLUMNS).where(_PAGE).order_by(JOBS.c.pk.desc()).limit(bindparam("rows"))
_NEWEST_AFTER = (
    select(*_JOB_COLUMNS)
    .where(_PAGE, JOBS.c.pk < bindparam("after_pk"))
    .order_by(JOBS.c.pk.desc())
    .limit(bindparam("rows"))
)


def list_jobs(
    *, connection: Connection, project_id: str, after: str | None, limit: int, metadata: dict[str, str] | None,
    metadata_null: bool = False,
) -> FineTuningJobList:  # fmt: skip
    """The project's jobs, newest first, after job `after`; `metadata` filters on every pair (AND)."""
    after_pk = (
        None
        if after is None
        else pagination.cursor_pk(connection, JOBS, JOBS.c.project_id == project_id, after=after, kind="job")
    )
    if metadata or metadata_null:
        statement = select(*_JOB_COLUMNS).where(JOBS.c.project_id == project_id)
        for key, value in (metadata or {}).items():
            statement = statement.where(JOBS.c.metadata[key].as_string() == value)
        if metadata_null:
            statement = statement.where(
                func.coalesce(cast(JOBS.c.metadata, String), "null").in_(["null", "{}"])
            )
        rows, has_more = pagination.page_rows(connection, statement, JOBS, after_pk=after_pk, limit=limit)
    else:  # the common page: one prepared statement, its compiled form cached
        params = {"project_id": project_id, "rows": limit + 1, "after_pk": after_pk}
        rows = list(connection.execute(_NEWEST if after_pk is None else _NEWEST_AFTER, params))
        rows, has_more = rows[:limit], len(rows) > limit
    return FineTuningJobList(data=[to_openai(r) for r in rows], has_more=has_more)  # type: ignore[arg-type]


def list_events(
    *, connection: Connection, project_id: str, job_id: str, after: str | None, limit: int
) -> FineTuningJobEventList:
    """A job's events, newest first, after event `after`."""
    _check_job(connection, project_id, job_id)
    scope = EVENTS.c.job_id == job_id
    after_pk = (
        None
        if after is None
        else pagination.cursor_pk(
            connection, EVENTS, scope, after=after, kind="event", within=f" in job {job_id}"
        )
    )
    rows, has_more = pagination.page_rows(connection, select(EVENTS).where(scope), EVENTS, after_pk=after_pk,
                                          limit=limit)  # fmt: skip
    return FineTuningJobEventList(data=[event_to_openai(r) for r in rows], has_more=has_more)  # type: ignore[arg-type]


def list_checkpoints(
    *, connection: Connection, project_id: str, job_id: str, after: str | None, limit: int
) -> FineTuningJobCheckpointList:
    """A job's kept checkpoints, newest first, after checkpoint `after`; a checkpoint whose model was deleted
    (`DELETE /v1/models/...` of it or of the job's final model) is gone from the list too."""
    _check_job(connection, project_id, job_id)
    model_deleted = exists().where(
        MODELS.c.id == CHECKPOINTS.c.fine_tuned_model_checkpoint, MODELS.c.deleted.is_(True)
    )
    statement = select(CHECKPOINTS).where(
        CHECKPOINTS.c.job_id == job_id, CHECKPOINTS.c.deleted.is_(False), ~model_deleted
    )
    after_pk = (
        None
        if after is None
        else pagination.cursor_pk(
            connection,
            CHECKPOINTS,
            CHECKPOINTS.c.job_id == job_id,
            after=after,
            kind="checkpoint",
            within=f" in job {job_id}",
        )  # fmt: skip
    )
    rows, has_more = pagination.page_rows(connection, statement, CHECKPOINTS, after_pk=after_pk, limit=limit)
    data = [checkpoint_to_openai(r) for r in rows]  # type: ignore[arg-type]
    return FineTuningJobCheckpointList(data=data, **pagination.ends(data), has_more=has_more)
