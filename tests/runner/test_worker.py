"""The worker against real Redis (arq, burst mode in-process, or a `tuneworks worker` process) and SQLite."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from core.job_status import JobStatus, transition
from core.queue import TRAIN_JOB
from core.settings import Settings
from core.tables import CheckpointRow, FileRow, ModelRow
from tests.conftest import REPO, settings_env
from tests.runner.data import chat_lines, jsonl
from tests.runner.factory import Factory, burst, run_burst


def models_of(factory: Factory, job_id: str) -> list[ModelRow]:
    with Session(factory.engine) as session:
        return list(session.exec(select(ModelRow).where(ModelRow.job_id == job_id)).all())


def metric_steps(factory: Factory, job_id: str) -> list[int]:
    return [e.data["step"] for e in factory.events(job_id) if e.type == "metrics" and e.data]


@pytest.mark.timeout(240)
def test_happy_path_to_succeeded(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(12)), validation=jsonl(chat_lines(4)), suffix="demo")
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "succeeded", factory.messages(job_id)
    name = f"ft:tuneworks/tiny-random-llama:proj-x:demo:{job_id.removeprefix('ftjob-')}"
    assert job.fine_tuned_model == name
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert job.method["supervised"]["hyperparameters"] == job.hyperparameters
    assert job.total_steps == 12 and job.step == 12 and job.trained_tokens and job.trained_tokens > 0
    assert job.lease_owner is None and job.finished_at and job.started_at and job.estimated_finish is None
    messages = factory.messages(job_id)
    for text in ["Files validated, moving job to queued state", "Fine-tuning job started",
                 "Checkpoint created at step 6", "Checkpoint created at step 12",
                 f"New fine-tuned model created: {name}", "The job has successfully completed"]:  # fmt: skip
        assert text in messages
    assert messages[-2:] == [f"New fine-tuned model created: {name}", "The job has successfully completed"]
    assert metric_steps(factory, job_id) == list(range(1, 13))
    metrics = [e for e in factory.events(job_id) if e.type == "metrics"]
    assert metrics[2].message.startswith("Step 3/12: training loss=")
    assert {"train_loss", "train_mean_token_accuracy", "total_steps"} <= set(metrics[0].data or {})
    assert "full_valid_loss" in (metrics[5].data or {}) and "valid_loss" in (metrics[-1].data or {})
    # result file
    with Session(factory.engine) as session:
        result = session.exec(select(FileRow).where(FileRow.id == job.result_files[0])).one()
        checkpoints = session.exec(select(CheckpointRow).where(CheckpointRow.job_id == job_id)).all()
    assert result.purpose == "fine-tune-results" and result.project_id == factory.project.id
    rows = list(csv.reader(io.StringIO(factory.store.path(result.storage_key).read_text())))
    assert rows[0] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 13))
    # models and adapters
    models = {m.id: m for m in models_of(factory, job_id)}
    assert set(models) == {name, f"{name}:ckpt-step-6", f"{name}:ckpt-step-12"}
    assert sorted(c.step_number for c in checkpoints) == [6, 12]
    for model in models.values():
        files = {p.name for p in factory.store.path(model.storage_key).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert models[name].storage_key == f"jobs/{job_id}/adapter" and models[name].checkpoint_step is None
    config = json.loads((factory.store.path(f"jobs/{job_id}/adapter") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tuneworks/tiny-random-llama"
    # evaluation and drift profile
    assert job.evaluation and job.evaluation["n_examples"] == 4 and "exact_match" in job.evaluation
    assert any(m.startswith("Evaluation on the validation file: loss=") for m in messages)
    assert factory.store.exists(f"jobs/{job_id}/drift_profile.json")
    assert not factory.store.exists(f"jobs/{job_id}/state")


@pytest.mark.timeout(120)
def test_invalid_file_fails_with_code_and_line(factory: Factory, wsettings: Settings) -> None:
    lines = chat_lines(12)
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]}).encode()
    job_id = factory.job(jsonl(lines))
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed"
    assert (
        job.error and job.error["code"] == "invalid_training_file" and job.error["param"] == "training_file"
    )
    assert "line 5" in job.error["message"]
    last = factory.events(job_id)[-1]
    assert last.level == "error" and last.message == job.error["message"]


@pytest.mark.timeout(120)
def test_nine_examples_fail_with_invalid_n_examples(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(9)))
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error
    assert (job.error["code"], job.error["param"]) == ("invalid_n_examples", "training_file")


@pytest.mark.timeout(120)
def test_unknown_base_model_fails_unsupported_model(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(10)), model="nobody/nothing")
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error and job.error["code"] == "unsupported_model"


async def _act_at_step(
    factory: Factory, wsettings: Settings, job_id: str, step: int, target: JobStatus
) -> int:
    """Run a burst worker; once the job reaches `step`, move it to `target` as the API would."""
    worker = asyncio.create_task(run_burst(wsettings))
    while not worker.done():
        steps = metric_steps(factory, job_id)
        if steps and steps[-1] >= step:
            transition(
                factory.engine,
                job_id,
                target,
                message=f"Job {target.value} by the user",
                expect=JobStatus.running,
            )
            break
        await asyncio.sleep(0.05)
    await worker
    return steps[-1]


LONG = {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 1}  # 4 x 30 steps


@pytest.mark.timeout(240)
def test_cancel_mid_run_stops_and_keeps_checkpoints(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(30)), hyperparameters=LONG)
    asyncio.run(factory.enqueue(job_id))
    at = asyncio.run(_act_at_step(factory, wsettings, job_id, 35, JobStatus.cancelled))
    job = factory.row(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.lease_owner is None
    last = max(metric_steps(factory, job_id))
    assert at <= last < 120
    assert any(m.startswith(f"Training stopped at step {last}/120") for m in factory.messages(job_id))
    assert [m.checkpoint_step for m in models_of(factory, job_id)] == [30]  # the epoch-1 checkpoint stays


@pytest.mark.timeout(300)
def test_pause_then_resume_continues_the_step_count(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(30)), hyperparameters=LONG)
    asyncio.run(factory.enqueue(job_id))
    asyncio.run(_act_at_step(factory, wsettings, job_id, 40, JobStatus.paused))
    paused = factory.row(job_id)
    assert paused.status == "paused" and paused.lease_owner is None and paused.attempts == 0
    stopped = max(metric_steps(factory, job_id))
    assert factory.store.exists(f"jobs/{job_id}/state")
    transition(factory.engine, job_id, JobStatus.queued, message="resumed", expect=JobStatus.paused)
    asyncio.run(factory.enqueue(job_id, TRAIN_JOB))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "succeeded", factory.messages(job_id)
    steps = metric_steps(factory, job_id)
    resumed_at = steps.index(stopped) + 1
    assert steps[:resumed_at] == list(range(1, stopped + 1))
    assert steps[resumed_at:] == list(range(stopped + 1, 121))
    assert f"Resuming from step {stopped}/120 (saved training state)" in factory.messages(job_id)
    assert len([m for m in models_of(factory, job_id) if m.checkpoint_step is None]) == 1


@pytest.mark.timeout(300)
def test_killed_worker_is_requeued_and_resumed(factory: Factory, wsettings: Settings, tmp_path: Path) -> None:
    job_id = factory.job(jsonl(chat_lines(30)), hyperparameters=LONG)
    asyncio.run(factory.enqueue(job_id))
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneworks"), "worker"], env=settings_env(factory.settings),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = metric_steps(factory, job_id)
            if steps and steps[-1] >= 40 and factory.store.exists(f"jobs/{job_id}/state"):
                break
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_at = max(metric_steps(factory, job_id))
    assert factory.row(job_id).status == "running"
    time.sleep(wsettings.lease_seconds + 0.5)
    burst(wsettings)  # its start-up reconciler requeues the job; it resumes from the saved state
    job = factory.row(job_id)
    assert job.status == "succeeded", factory.messages(job_id)
    messages = factory.messages(job_id)
    assert "Worker lost; resuming from the newest checkpoint" in messages
    resumed = [m for m in messages if m.startswith("Resuming from step ")]
    assert len(resumed) == 1 and 0 < int(resumed[0].split()[3].split("/")[0]) <= killed_at
    finals = [m for m in models_of(factory, job_id) if m.checkpoint_step is None]
    assert len(finals) == 1 and finals[0].id == job.fine_tuned_model
    assert sorted({s for s in metric_steps(factory, job_id)}) == list(range(1, 121))


@pytest.mark.timeout(120)
def test_job_that_keeps_crashing_ends_too_many_attempts(factory: Factory, wsettings: Settings) -> None:
    # The state crashed workers leave: running, lease expired, attempts used up.
    job_id = factory.job(jsonl(chat_lines(10)), status="running", attempts=wsettings.job_max_attempts,
                         lease_owner="dead-worker", lease_expires_at=time.time() - 60)  # fmt: skip
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error and job.error["code"] == "too_many_attempts"
    assert job.lease_owner is None
    assert "Worker lost; resuming from the newest checkpoint" in factory.messages(job_id)


@pytest.mark.timeout(120)
def test_reconciler_enqueues_a_queued_job_that_redis_lost(factory: Factory, wsettings: Settings) -> None:
    job_id = factory.job(jsonl(chat_lines(10)), status="queued", queue_token="train_job:gone:xxxxxxxx",
                         hyperparameters={"n_epochs": 1, "batch_size": 5})  # fmt: skip
    burst(wsettings)
    assert factory.row(job_id).status == "succeeded"


@pytest.mark.timeout(120)
def test_unsupported_method_fails_at_validation(factory: Factory, wsettings: Settings) -> None:
    from sqlalchemy import update

    from core.tables import JobRow

    job_id = factory.job(jsonl(chat_lines(10)))
    with Session(factory.engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(method={"type": "reinforcement"}))  # type: ignore[arg-type]
        session.commit()
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error
    assert (job.error["code"], job.error["param"]) == ("unsupported_method", "method.type")


@pytest.mark.timeout(300)
def test_worker_process_metrics_and_graceful_stop(
    factory: Factory, wsettings: Settings, tmp_path: Path
) -> None:
    import httpx

    from tests.conftest import free_port, wait_for_port

    port = free_port()
    job_id = factory.job(jsonl(chat_lines(30)), hyperparameters=LONG)
    asyncio.run(factory.enqueue(job_id))
    env = settings_env(factory.settings.model_copy(update={"worker_metrics_port": port}))
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneworks"), "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for_port(port, timeout=60, proc=proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and max(metric_steps(factory, job_id), default=0) < 10:
            time.sleep(0.1)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'ft_training_steps_total{base_model="tuneworks/tiny-random-llama"}' in text
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    job = factory.row(job_id)
    assert job.status == "queued" and job.lease_owner is None, (tmp_path / "worker.log").read_text()[-3000:]
    assert "Worker stopped; the job will resume on another worker" in factory.messages(job_id)
    assert factory.store.exists(f"jobs/{job_id}/state")
    burst(wsettings)
    assert factory.row(job_id).status == "succeeded"
    assert len([m for m in factory.messages(job_id) if m.startswith("Resuming from step")]) == 1


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneworks"), "worker"], env=settings_env(settings),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


@pytest.mark.timeout(300)
def test_a_job_killed_more_often_than_the_limit_finishes_while_it_progresses(
    factory: Factory, wsettings: Settings, tmp_path: Path
) -> None:
    """kill -9 of the worker four times (the limit is three), each time after the attempt trained some steps and
    saved resume state: the crashes are ours, not the job's, so it resumes each time and succeeds."""
    job_id = factory.job(jsonl(chat_lines(30)), hyperparameters=LONG)
    asyncio.run(factory.enqueue(job_id))
    kills = wsettings.job_max_attempts + 1
    for kill in range(kills):
        log = tmp_path / f"worker-{kill}.log"
        proc = start_worker(wsettings, log)
        try:
            wanted = len(metric_steps(factory, job_id)) + 15  # about a second of training: state gets saved
            deadline = time.monotonic() + 90
            while len(metric_steps(factory, job_id)) < wanted:
                job = factory.row(job_id)
                assert job.status in {"validating_files", "queued", "running"}, (kill, job.status, job.error)
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    time.sleep(wsettings.lease_seconds + 0.5)
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "succeeded", (job.error, factory.messages(job_id))
    resumed = [int(m.split()[3].split("/")[0]) for m in factory.messages(job_id) if m.startswith("Resuming")]
    assert len(resumed) == kills and resumed == sorted(set(resumed)) and resumed[0] > 0  # progress every time
    assert metric_steps(factory, job_id) == list(range(1, 121)), "each step's event once"
    assert job.attempts == 0
