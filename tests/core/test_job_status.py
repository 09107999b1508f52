"""The job status transition table, checked move by move: `can_move` against a table typed out here, and
`transition()` on a real SQLite database (status, event, `finished_at`, compare-and-set)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.db import init_db, make_engine
from core.ids import new_id
from core.job_status import IllegalTransition, JobStatus, can_move, job_event, transition
from core.tables import JobEventRow, JobRow, ModelRow

S = JobStatus

# The legal moves, written out rather than derived from `core.job_status.TRANSITIONS`.
LEGAL: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (S.validating_files, S.queued),
        (S.validating_files, S.failed),
        (S.validating_files, S.cancelled),
        (S.queued, S.running),
        (S.queued, S.paused),
        (S.queued, S.failed),
        (S.queued, S.cancelled),
        (S.running, S.queued),  # the worker's lease expired: back to the queue
        (S.running, S.paused),
        (S.running, S.succeeded),
        (S.running, S.failed),
        (S.running, S.cancelled),
        (S.paused, S.queued),
        (S.paused, S.cancelled),
        # succeeded, failed, cancelled: terminal, no move out
    }
)
TERMINAL = {S.succeeded, S.failed, S.cancelled}

ALL_PAIRS = [(current, target) for current in JobStatus for target in JobStatus]
LEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair in LEGAL]
ILLEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair not in LEGAL]
# Every legal move tried with `expect=` each status the job is not in.
WRONG_EXPECT = [(c, t, e) for c, t in LEGAL_PAIRS for e in JobStatus if e != c]


def move_ids(moves: Sequence[tuple[JobStatus, ...]]) -> list[str]:
    """Test ids such as `queued->running` (and `queued->running-expect-paused`)."""
    return [
        "->".join(s.value for s in move[:2]) + "".join(f"-expect-{s.value}" for s in move[2:])
        for move in moves
    ]


def test_the_statuses_are_the_seven_of_the_design() -> None:
    assert {s.value for s in JobStatus} == {
        "validating_files",
        "queued",
        "running",
        "paused",
        "succeeded",
        "failed",
        "cancelled",
    }


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=move_ids(ALL_PAIRS))
def test_can_move_is_the_table(current: JobStatus, target: JobStatus) -> None:
    assert can_move(current, target) is ((current, target) in LEGAL)
    assert can_move(current.value, target.value) is ((current, target) in LEGAL)  # plain strings work too


# --- transition() on a real database ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One SQLite database for the module; each test makes its own job in it."""
    folder: Path = tmp_path_factory.mktemp("job-status")
    engine = make_engine(f"sqlite:///{folder}/t.db")
    init_db(engine)
    yield engine
    engine.dispose()


def new_job(engine: Engine, status: JobStatus) -> str:
    job_id = new_id("ftjob-")
    row = JobRow(
        id=job_id,
        project_id="proj_test",
        model="tuneworks/tiny-random-llama",
        status=status.value,
        training_file="file-test",
    )
    with Session(engine) as session:
        session.add(row)
        session.commit()
    return job_id


def job_row(engine: Engine, job_id: str) -> JobRow:
    with Session(engine, expire_on_commit=False) as session:
        return session.exec(select(JobRow).where(JobRow.id == job_id)).one()


def events(engine: Engine, job_id: str) -> list[JobEventRow]:
    with Session(engine) as session:
        return list(session.exec(select(JobEventRow).where(JobEventRow.job_id == job_id)).all())


def event_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(JobEventRow)).one())


def snapshot(row: JobRow) -> dict:
    return row.model_dump()


@pytest.mark.parametrize(("current", "target"), LEGAL_PAIRS, ids=move_ids(LEGAL_PAIRS))
def test_transition_performs_every_legal_move(engine: Engine, current: JobStatus, target: JobStatus) -> None:
    job_id = new_job(engine, current)
    message = f"moved from {current.value} to {target.value}"
    returned = transition(engine, job_id, target, message=message, level="warn", data={"why": "test"})
    row = job_row(engine, job_id)
    assert row.status == returned.status == target.value
    [event] = events(engine, job_id)
    assert (event.message, event.level, event.type, event.data) == (
        message,
        "warn",
        "message",
        {"why": "test"},
    )
    if target in TERMINAL:
        assert row.finished_at is not None and row.finished_at >= row.created_at
    else:
        assert row.finished_at is None


@pytest.mark.parametrize(("current", "target"), LEGAL_PAIRS, ids=move_ids(LEGAL_PAIRS))
def test_transition_with_the_right_expect_and_fields(
    engine: Engine, current: JobStatus, target: JobStatus
) -> None:
    job_id = new_job(engine, current)
    transition(engine, job_id, target, message="ok", expect={current, S.paused}, step=5, finished_at=123)
    row = job_row(engine, job_id)
    assert (row.status, row.step, row.finished_at) == (target.value, 5, 123)  # a given finished_at is kept
    assert len(events(engine, job_id)) == 1


@pytest.mark.parametrize(("current", "target"), ILLEGAL_PAIRS, ids=move_ids(ILLEGAL_PAIRS))
def test_transition_refuses_every_illegal_move(engine: Engine, current: JobStatus, target: JobStatus) -> None:
    job_id = new_job(engine, current)
    before, count = snapshot(job_row(engine, job_id)), event_count(engine)
    with pytest.raises(IllegalTransition) as raised:
        transition(engine, job_id, target, message="must not be written", step=99)
    assert (raised.value.job_id, raised.value.current, raised.value.target) == (job_id, current, target)
    assert snapshot(job_row(engine, job_id)) == before
    assert event_count(engine) == count
    assert events(engine, job_id) == []


@pytest.mark.parametrize(("current", "target", "expect"), WRONG_EXPECT, ids=move_ids(WRONG_EXPECT))
def test_transition_with_a_wrong_expect_changes_nothing(
    engine: Engine, current: JobStatus, target: JobStatus, expect: JobStatus
) -> None:
    """Compare-and-set: the move is legal from the job's status, but the caller believes it is elsewhere."""
    job_id = new_job(engine, current)
    before, count = snapshot(job_row(engine, job_id)), event_count(engine)
    with pytest.raises(IllegalTransition):
        transition(engine, job_id, target, message="must not be written", expect=expect)
    with pytest.raises(IllegalTransition):
        transition(engine, job_id, target, message="must not be written", expect={expect})
    assert snapshot(job_row(engine, job_id)) == before
    assert event_count(engine) == count


def test_transition_of_an_unknown_job_is_a_key_error(engine: Engine) -> None:
    count = event_count(engine)
    with pytest.raises(KeyError):
        transition(engine, "ftjob-none", S.cancelled, message="no such job")
    assert event_count(engine) == count


# --- where= (more columns in the compare-and-set) and also= (rows committed with the change) --------------


def model_rows(engine: Engine, job_id: str) -> list[ModelRow]:
    with Session(engine) as session:
        return list(session.exec(select(ModelRow).where(ModelRow.job_id == job_id)).all())


def add_model(job_id: str):  # type: ignore[no-untyped-def]
    def rows(session: Session) -> None:
        session.add(ModelRow(id=f"ft:m:{job_id}", project_id="proj_test", job_id=job_id, base_model="m",
                             storage_key=f"jobs/{job_id}/adapter"))  # fmt: skip
        session.add(job_event(job_id, "New fine-tuned model created"))

    return rows


def leased_job(engine: Engine) -> str:
    job_id = new_job(engine, S.running)
    with Session(engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_owner="w1", lease_epoch=2))  # type: ignore[arg-type]
        session.commit()
    return job_id


def test_where_and_also_commit_the_rows_with_the_change(engine: Engine) -> None:
    job_id = leased_job(engine)
    transition(engine, job_id, S.succeeded, message="done", expect=S.running,
               where={"lease_owner": "w1", "lease_epoch": 2}, also=add_model(job_id))  # fmt: skip
    assert job_row(engine, job_id).status == "succeeded"
    assert [m.id for m in model_rows(engine, job_id)] == [f"ft:m:{job_id}"]
    assert [e.message for e in sorted(events(engine, job_id), key=lambda e: e.pk or 0)] == [
        "New fine-tuned model created",
        "done",
    ]


@pytest.mark.parametrize("where", [{"lease_owner": "w2", "lease_epoch": 2}, {"lease_owner": "w1", "lease_epoch": 1},
                                   {"lease_owner": None}])  # fmt: skip
def test_a_where_that_does_not_hold_writes_nothing(engine: Engine, where: dict) -> None:
    job_id = leased_job(engine)
    before, count = snapshot(job_row(engine, job_id)), event_count(engine)
    with pytest.raises(IllegalTransition):
        transition(engine, job_id, S.succeeded, message="late", where=where, also=add_model(job_id))
    assert snapshot(job_row(engine, job_id)) == before and event_count(engine) == count
    assert model_rows(engine, job_id) == []


def test_also_raising_rolls_the_change_back(engine: Engine) -> None:
    job_id = leased_job(engine)

    def broken(session: Session) -> None:
        add_model(job_id)(session)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        transition(engine, job_id, S.succeeded, message="done", also=broken)
    assert job_row(engine, job_id).status == "running" and model_rows(engine, job_id) == []
    assert events(engine, job_id) == []
