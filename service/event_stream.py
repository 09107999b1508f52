"""`GET /v1/fine_tuning/jobs/{id}/events?stream=true`: a job's events as server-sent events.

The stream sends the job's existing events oldest first, then each new one as the worker writes it, and ends
once the job is terminal (after its last events are sent). The database is polled cheaply (one indexed query on
`(job_id, pk)` every `POLL_SECONDS`, in a worker thread, no session held across an `await`); a comment line is
sent every `HEARTBEAT_SECONDS` so proxies keep the connection open, and a stream lasts at most `MAX_SECONDS`
(then the client reconnects with `Last-Event-ID`, which resumes after that event). Each message is
`id: <event id>`, `event: <type>` (`message` or `metrics`) and `data: <the FineTuningJobEvent JSON>`; the last
one is `event: end` with the job's final status.

The same tenancy as every `/v1` route: another project's job is a 404 before anything is streamed. Without
`stream=true` the route is the plain paginated list (the SDK's `list_events`), unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from sqlmodel import Session, col, select
from starlette.requests import Request
from starlette.responses import StreamingResponse

from core.job_status import TERMINAL
from core.tables import JobEventRow, JobRow
from service import jobs
from service.deps import Database

POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
MAX_SECONDS = 600.0
BATCH = 100  # events read per query


@dataclass
class _Poll:
    events: list[JobEventRow]
    status: str


def wants_stream(request: Request) -> bool:
    """`?stream=true` (also `1`/`yes`), read from the query so the documented list operation stays as it is."""
    return request.query_params.get("stream", "").lower() in {"true", "1", "yes"}


async def stream_events(
    *, request: Request, database: Database, project_id: str, job_id: str, max_seconds: float = MAX_SECONDS
) -> StreamingResponse:
    """The SSE response for one job, after checking (404) that it belongs to the project.

    Args:
        request: the request (its `Last-Event-ID` header resumes after that event).
        database: the API's database access.
        project_id: the caller's project.
        job_id: the job whose events to stream.
        max_seconds: the stream's longest lifetime.

    Returns:
        A `text/event-stream` response.

    Raises:
        NotFound: the job does not exist in this project.
    """
    after_pk = await database.run(_start, project_id=project_id, job_id=job_id,
                                  last_event_id=request.headers.get("last-event-id"))  # fmt: skip
    body = _messages(request=request, database=database, job_id=job_id, after_pk=after_pk,
                     max_seconds=max_seconds)  # fmt: skip
    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def _start(*, session: Session, project_id: str, job_id: str, last_event_id: str | None) -> int:
    """The pk to stream after: 0, or that of the `Last-Event-ID` event of this job. Raises 404 first."""
    jobs.get_row(session=session, project_id=project_id, job_id=job_id)
    if not last_event_id:
        return 0
    pk = session.exec(
        select(JobEventRow.pk).where(JobEventRow.job_id == job_id, JobEventRow.id == last_event_id)
    ).first()
    return int(pk or 0)


def _poll(*, session: Session, job_id: str, after_pk: int) -> _Poll:
    """The next events after `after_pk` (oldest first) and the job's status, read in one session."""
    statement = (
        select(JobEventRow)
        .where(JobEventRow.job_id == job_id, col(JobEventRow.pk) > after_pk)
        .order_by(col(JobEventRow.pk))
        .limit(BATCH)
    )
    events = list(session.exec(statement).all())
    status = session.exec(select(JobRow.status).where(JobRow.id == job_id)).first()
    return _Poll(events=events, status=str(status or "cancelled"))


async def _messages(
    *, request: Request, database: Database, job_id: str, after_pk: int, max_seconds: float
) -> AsyncIterator[str]:
    started = last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while time.monotonic() - started < max_seconds:
        poll = await database.run(_poll, job_id=job_id, after_pk=after_pk)
        for row in poll.events:
            after_pk = int(row.pk or after_pk)
            yield _message(row)
            last_sent = time.monotonic()
        if len(poll.events) == BATCH:
            continue  # more are waiting: no sleep
        if poll.status in {s.value for s in TERMINAL}:
            yield f"event: end\ndata: {json.dumps({'status': poll.status})}\n\n"
            return
        if time.monotonic() - last_sent >= HEARTBEAT_SECONDS:
            yield ": heartbeat\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(POLL_SECONDS)


def _message(row: JobEventRow) -> str:
    data = jobs.event_to_openai(row).model_dump_json()
    return f"id: {row.id}\nevent: {row.type}\ndata: {data}\n\n"
