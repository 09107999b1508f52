"""Finishing a training job against real Redis and SQLite: success is one fenced commit with the model row, and
the adapters are announced only after it; a cancel or a lost lease at the last moment leaves no model.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as redis_errors
from sqlalchemy import update
from sqlmodel import Session, select

import runner.evaluation
from core.job_spec import JobSpec
from core.job_status import JobStatus, transition
from core.settings import Settings
from core.store_keys import adapter_key, checkpoint_key, state_key
from core.tables import CheckpointRow, FileRow, JobRow, ModelRow
from runner import lease, training_job
from runner.callbacks import JobCallbacks
from runner.lease import Lease
from tests.runner.data import chat_lines, jsonl
from tests.runner.factory import Factory, run_burst_listening

TRAIN, VALID = jsonl(chat_lines(12)), jsonl(chat_lines(4))  # 2 epochs x 6 steps, checkpoints at 6 and 12


def models_of(factory: Factory, job_id: str) -> list[ModelRow]:
    with Session(factory.engine) as session:
        return list(session.exec(select(ModelRow).where(ModelRow.job_id == job_id)).all())


def result_files(factory: Factory) -> list[FileRow]:
    with Session(factory.engine) as session:
        return list(session.exec(select(FileRow).where(FileRow.purpose == "fine-tune-results")).all())


def during_final_evaluation(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """Run `action(job_id)` when the worker starts the final evaluation (after the last step)."""
    real = runner.evaluation.evaluate

    def evaluate(model: Any, tokenizer: Any, dataset: Any, **kwargs: Any) -> dict[str, Any]:
        action()
        return real(model, tokenizer, dataset, **kwargs)

    monkeypatch.setattr(runner.evaluation, "evaluate", evaluate)


def run(factory: Factory, wsettings: Settings, job_id: str) -> list[str]:
    """Validate and train `job_id` with a burst worker; returns the adapter events published for it."""
    asyncio.run(factory.enqueue(job_id))
    events = asyncio.run(run_burst_listening(wsettings))
    return [f"{e.event} {e.model}" for e in events if job_id.removeprefix("ftjob-") in e.model]


@pytest.mark.timeout(180)
def test_cancel_during_the_final_evaluation_leaves_no_model(
    factory: Factory, wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = factory.job(TRAIN, validation=VALID)
    during_final_evaluation(monkeypatch, lambda: transition(
        factory.engine, job_id, JobStatus.cancelled, message="Job cancelled by the user", expect=JobStatus.running
    ))  # fmt: skip
    published = run(factory, wsettings, job_id)
    job = factory.row(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.result_files == []
    assert published == []  # nothing announced for a job that did not succeed
    # The checkpoints stay servable, as OpenAI keeps the checkpoints of a cancelled job; no final model row.
    assert sorted((m.checkpoint_step, m.deleted) for m in models_of(factory, job_id)) == [
        (6, False),
        (12, False),
    ]
    assert not factory.store.exists(adapter_key(job_id)) and result_files(factory) == []
    assert not any(m.startswith("New fine-tuned model created") for m in factory.messages(job_id))


@pytest.mark.timeout(180)
def test_a_redis_error_when_announcing_still_succeeds(
    factory: Factory, wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(redis: Any, event: str, model: str) -> None:
        raise redis_errors.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(training_job, "publish_adapter_event", broken)
    job_id = factory.job(TRAIN, validation=VALID)
    run(factory, wsettings, job_id)
    job = factory.row(job_id)
    assert job.status == "succeeded", factory.messages(job_id)
    assert [m.id for m in models_of(factory, job_id) if m.checkpoint_step is None] == [job.fine_tuned_model]
    assert job.lease_owner is None and not factory.store.exists(state_key(job_id))


@pytest.mark.timeout(180)
def test_success_is_announced_after_the_commit(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(TRAIN, validation=VALID, suffix="live")
    published = run(factory, wsettings, job_id)
    job = factory.row(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model
    name = job.fine_tuned_model
    assert sorted(published) == sorted(
        [f"ready {name}:ckpt-step-6", f"ready {name}:ckpt-step-12", f"ready {name}"]
    )
    [result] = result_files(factory)
    assert job.result_files == [result.id] and factory.store.exists(result.storage_key)
    assert factory.messages(job_id)[-2:] == [f"New fine-tuned model created: {name}",
                                             "The job has successfully completed"]  # fmt: skip


@pytest.mark.timeout(180)
def test_a_worker_that_lost_its_lease_cannot_succeed_or_overwrite_the_adapter(
    factory: Factory, wsettings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker stalls long enough for its lease to pass to another worker (here: its heartbeat never
    notices), and the other worker has stored its adapter already."""
    job_id = factory.job(TRAIN, validation=VALID)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "adapter_model.safetensors").write_bytes(b"the new owner's adapter")

    def take_over() -> None:
        with Session(factory.engine) as session:
            session.execute(update(JobRow).where(JobRow.id == job_id).values(  # type: ignore[arg-type]
                lease_owner="other-worker", lease_epoch=JobRow.lease_epoch + 1, lease_expires_at=time.time() + 600))  # fmt: skip
            session.commit()
        factory.store.put_dir(adapter_key(job_id), theirs)

    renew = lease.renew  # renews while it holds the lease, but never notices losing it
    monkeypatch.setattr(lease, "renew", lambda *args, **kwargs: renew(*args, **kwargs) or True)
    during_final_evaluation(monkeypatch, take_over)
    published = run(factory, wsettings, job_id)
    job = factory.row(job_id)
    assert job.status == "running" and job.lease_owner == "other-worker" and job.fine_tuned_model is None
    assert sorted(p.name for p in factory.store.path(adapter_key(job_id)).iterdir()) == [
        "adapter_model.safetensors"
    ]
    assert (factory.store.path(adapter_key(job_id)) / "adapter_model.safetensors").read_bytes() == (
        b"the new owner's adapter"
    )
    assert [m for m in models_of(factory, job_id) if m.checkpoint_step is None] == []
    assert published == [] and result_files(factory) == []


def leased_callbacks(factory: Factory) -> tuple[JobCallbacks, str]:
    job_id = factory.job(TRAIN, status="running")
    with Session(factory.engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_owner="w1", lease_epoch=1))  # type: ignore[arg-type]
        session.commit()
    job = factory.row(job_id)
    callbacks = JobCallbacks(engine=factory.engine, store=factory.store, job=job, spec=JobSpec.from_row(job),
                             held=Lease(job_id, "w1", 1), model_name=f"ft:x:{job_id}", keep=3)  # fmt: skip
    callbacks.first_step = 0
    return callbacks, job_id


def test_checkpoints_and_resume_state_are_fenced_by_the_lease(factory: Factory, tmp_path: Path) -> None:
    callbacks, job_id = leased_callbacks(factory)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    callbacks.on_resume_state(3, adapter)  # held: written, and the attempt counts as progress
    assert factory.store.exists(state_key(job_id)) and callbacks.progressed and not callbacks.lost
    with Session(factory.engine) as session:  # a later acquire by another worker
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_owner="w2", lease_epoch=2))  # type: ignore[arg-type]
        session.commit()
    (adapter / "adapter_model.safetensors").write_bytes(b"stale weights")
    callbacks.on_resume_state(4, adapter)
    assert callbacks.lost
    assert (factory.store.path(state_key(job_id)) / "adapter_model.safetensors").read_bytes() == b"weights"
    callbacks.lost = False  # the checkpoint hook checks the fence itself, not only the flag
    callbacks.on_checkpoint(6, 1, adapter)
    assert callbacks.lost and not factory.store.exists(checkpoint_key(job_id, 6))
    with Session(factory.engine) as session:
        assert session.exec(select(CheckpointRow).where(CheckpointRow.job_id == job_id)).all() == []
    assert models_of(factory, job_id) == []


@pytest.mark.parametrize("status", [JobStatus.cancelled, JobStatus.failed, JobStatus.succeeded])
def test_the_training_loop_stops_on_every_final_status(factory: Factory, status: JobStatus) -> None:
    callbacks, job_id = leased_callbacks(factory)
    assert callbacks.should_stop() is None
    transition(factory.engine, job_id, status, message="moved by someone else", expect=JobStatus.running)
    callbacks.last_poll = 0.0
    assert callbacks.should_stop() == "cancel"
