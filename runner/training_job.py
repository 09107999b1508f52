"""The `train_job` queue function: one training attempt of a job, from lease to `succeeded`.

The trainer runs in a thread (`asyncio.to_thread`) while an asyncio task renews the lease; `runner.callbacks`
turns the trainer's hooks into job events, checkpoints and resume state, and reads cancel/pause from the job row
between steps. What to train comes from the job spec (`core.job_spec`). Every exit path releases the lease;
failures end in `failed` with an OpenAI error code.

Finishing has the shape of every durable change: the final adapter is stored (fenced by the lease), then one
transaction moves the job to `succeeded` with the lease in its compare-and-set and the model and result file
rows in the same commit, and only then are the adapters announced on Redis. A cancel that wins the race leaves
no model; a publish that fails leaves a succeeded job (the serve process's sweep finds the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core import drift_profile, metrics
from core.failures import JobFailure
from core.ids import new_id, now
from core.job_spec import JobSpec
from core.job_status import IllegalTransition, JobStatus, add_event, job_event, transition
from core.naming import fine_tuned_model_name
from core.queue import publish_adapter_event
from core.settings import Settings
from core.storage import ArtifactStore, FenceLost
from core.store_keys import adapter_key, state_key
from core.tables import FileRow, JobEventRow, JobRow, ModelRow
from core.train_config import TrainConfig
from runner import artifacts, lease
from runner.callbacks import JobCallbacks
from runner.datasets import DEFAULT_MAX_SEQ_LEN, Tokenization, load_dataset
from runner.lease import Lease
from runner.preference import load_pairs
from runner.trainer import TrainResult, train

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 5.0  # a Redis that hangs must not hold a finished job's worker slot


def new_owner() -> str:
    """A unique lease owner name for one attempt: host, pid and a random part."""
    return new_id(f"{socket.gethostname()}:{os.getpid()}:", 8)


async def train_job(ctx: dict[str, Any], job_id: str) -> str:
    """arq function: train (or resume) job `job_id`. Safe to run twice: without the lease it does nothing.

    Returns:
        What happened: skipped, succeeded, failed, paused, cancelled, lost or requeued.
    """
    settings: Settings = ctx["settings"]
    engine: Engine = ctx["engine"]
    owner = new_owner()
    job = lease.acquire(engine, job_id, owner=owner, seconds=settings.lease_seconds)
    if job is None:
        logger.info("job %s: not trainable now (not queued, or leased by another worker)", job_id)
        return "skipped"
    outcome = "crashed"
    try:
        outcome = await _attempt(ctx, job, owner)
        return outcome
    finally:
        lease.release(engine, job_id, owner=owner, clean=outcome in {"paused", "requeued", "succeeded"})
        metrics.TRAIN_RUNS.labels(base_model=job.model, outcome=outcome).inc()


async def _attempt(ctx: dict[str, Any], job: JobRow, owner: str) -> str:
    settings: Settings = ctx["settings"]
    engine: Engine = ctx["engine"]
    held = Lease.of(job)
    if job.attempts > settings.job_max_attempts:
        message = (f"Training was interrupted {job.attempts - 1} times without progress "
                   f"(the limit is {settings.job_max_attempts})")  # fmt: skip
        return _fail(engine, job, held, JobFailure("too_many_attempts", message))
    if not _start(engine, job):
        return "skipped"
    heartbeat = asyncio.create_task(_heartbeat(engine, job.id, owner, settings.lease_seconds, ctx))
    metrics.WORKERS_BUSY.inc()
    try:
        return await _train_and_finish(ctx, job, held)
    except JobFailure as exc:
        return _fail(engine, job, held, exc)
    except Exception as exc:  # noqa: BLE001  every other error fails the job with its message, not a hang
        logger.exception("job %s: training failed", job.id)
        return _fail(engine, job, held, _classify(exc))
    finally:
        heartbeat.cancel()
        metrics.WORKERS_BUSY.dec()


def _start(engine: Engine, job: JobRow) -> bool:
    """Move the job to running (a takeover of an expired running job just says so). False when it moved away."""
    if job.status == JobStatus.running:
        add_event(engine, job.id, "Worker lost; resuming from the newest checkpoint", level="warn")
        return True
    queued_since = _last_event_time(engine, job.id)
    try:
        transition(engine, job.id, JobStatus.running, message="Fine-tuning job started", expect=JobStatus.queued,
                   started_at=job.started_at or now())  # fmt: skip
    except IllegalTransition:
        logger.info("job %s: no longer queued; not starting", job.id)
        return False
    if queued_since is not None:
        metrics.JOB_QUEUE_WAIT.labels(base_model=job.model).observe(max(0, now() - queued_since))
    return True


def _last_event_time(engine: Engine, job_id: str) -> int | None:
    """When the job's latest event was written: for a queued job, its move to queued (or a later note)."""
    with Session(engine) as session:
        event = session.exec(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(col(JobEventRow.pk).desc())
        ).first()
    return None if event is None else event.created_at


def _classify(exc: Exception) -> JobFailure:
    import torch

    text = str(exc) or type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in text.lower():
        return JobFailure("out_of_memory", f"Training ran out of memory: {text[:300]}")
    return JobFailure("training_failed", f"Training failed: {type(exc).__name__}: {text[:500]}")


def _fail(engine: Engine, job: JobRow, held: Lease, exc: JobFailure) -> str:
    try:
        transition(engine, job.id, JobStatus.failed, message=exc.message, level="error",
                   expect={JobStatus.queued, JobStatus.running}, where=held.columns, error=exc.as_error(),
                   estimated_finish=None)  # fmt: skip
    except IllegalTransition:
        logger.info("job %s: not failed (%s): it moved on already, or the lease was lost", job.id, exc.code)
    return "failed"


async def _heartbeat(engine: Engine, job_id: str, owner: str, seconds: float, ctx: dict[str, Any]) -> None:
    while True:
        await asyncio.sleep(max(0.2, seconds / 3))
        # In a thread: a busy database must not stall the event loop (and with it every other renewal).
        if not await asyncio.to_thread(lease.renew, engine, job_id, owner=owner, seconds=seconds):
            logger.warning("job %s: lease lost by %s", job_id, owner)
            callbacks = ctx.get("callbacks", {}).get(job_id)
            if callbacks is not None:
                callbacks.lost = True
            return
        metrics.WORKER_HEARTBEATS.inc()


async def _train_and_finish(ctx: dict[str, Any], job: JobRow, held: Lease) -> str:
    settings: Settings = ctx["settings"]
    engine: Engine = ctx["engine"]
    store: ArtifactStore = ctx["store"]
    project = artifacts.project_name(engine, job.project_id)
    model_name = fine_tuned_model_name(
        base_model=job.model, project=project, suffix=job.suffix, job_id=job.id
    )
    spec = JobSpec.from_row(job)
    callbacks = JobCallbacks(engine=engine, store=store, job=job, spec=spec, held=held, model_name=model_name,
                             keep=settings.checkpoints_keep)  # fmt: skip
    ctx.setdefault("callbacks", {})[job.id] = callbacks
    work = Path(tempfile.mkdtemp(dir=_work_root(settings), prefix=f"{job.id}-"))
    try:
        future = asyncio.ensure_future(asyncio.to_thread(_run, settings, store, job, work, callbacks))
        try:
            run = await asyncio.shield(future)
        except asyncio.CancelledError:
            return await _shutdown(engine, job, callbacks, future)
        return await _outcome(ctx, job, callbacks, run, model_name)
    finally:
        ctx["callbacks"].pop(job.id, None)
        shutil.rmtree(work, ignore_errors=True)


async def _shutdown(engine: Engine, job: JobRow, callbacks: JobCallbacks, future: asyncio.Future) -> str:
    """The worker is stopping: let the trainer save resume state, then put the job back in the queue."""
    callbacks.shutdown = True
    await asyncio.wait([future], timeout=120)
    with contextlib.suppress(IllegalTransition):
        transition(engine, job.id, JobStatus.queued, message="Worker stopped; the job will resume on another worker",
                   level="warn", expect=JobStatus.running, where=callbacks.held.columns)  # fmt: skip
    return "requeued"


class _RunOutput:
    def __init__(self, result: TrainResult, evaluation: dict | None, prompts: list[str]) -> None:
        self.result, self.evaluation, self.prompts = result, evaluation, prompts


def _run(
    settings: Settings, store: ArtifactStore, job: JobRow, work: Path, callbacks: JobCallbacks
) -> _RunOutput:
    """The thread: prepare the model, load data, train, evaluate."""
    from transformers import AutoTokenizer

    from core.weights import UnknownModel, ensure_prepared

    try:
        base = ensure_prepared(settings, job.model)
    except UnknownModel as exc:
        raise JobFailure(
            "unsupported_model", f"Model {job.model} is not available for fine-tuning", "model"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenization = Tokenization(tokenizer, max_seq_len=_max_seq_len(base.path))
    spec = callbacks.spec
    init = _fetch_init_adapter(callbacks.engine, store, spec.init_from, work) if spec.init_from else None
    config = spec.train_config(settings=settings, model_path=base.path, output_dir=work / "run",
                               base_model_name=job.model, init_adapter=init)  # fmt: skip
    resume = _fetch_state(store, job.id, work)
    if spec.method == "dpo":
        return _run_dpo(job, store, tokenization, config, callbacks, resume)
    train_set = _load(job, store, job.training_file, tokenization, callbacks.engine)
    valid_set = (
        _load(job, store, job.validation_file, tokenization, callbacks.engine)
        if job.validation_file
        else None
    )
    result = train(config, train_set, valid_set, callbacks=callbacks, resume=resume)
    evaluation = None
    if result.model is not None and valid_set is not None and len(valid_set):
        from runner.evaluation import evaluate

        evaluation = evaluate(
            result.model, tokenization.tokenizer, valid_set, micro_batch_tokens=config.micro_batch_tokens
        )
    result.model = None
    return _RunOutput(result, evaluation, train_set.prompts)


def _run_dpo(
    job: JobRow, store: ArtifactStore, tokenization: Tokenization, config: TrainConfig, callbacks: JobCallbacks,
    resume: Path | None,
) -> _RunOutput:  # fmt: skip
    """The DPO part of the thread: preference pairs, DPO training, preference evaluation."""
    from runner.dpo import train_dpo
    from runner.evaluation import evaluate_preferences

    engine = callbacks.engine
    train_set = _load(job, store, job.training_file, tokenization, engine, loader=load_pairs)
    valid_set = (
        _load(job, store, job.validation_file, tokenization, engine, loader=load_pairs)
        if job.validation_file
        else None
    )
    result = train_dpo(config, train_set, valid_set, callbacks=callbacks, resume=resume)
    evaluation = None
    if (
        result.model is not None
        and valid_set is not None
        and len(valid_set)
        and result.valid_reference is not None
    ):
        evaluation = evaluate_preferences(result.model, tokenization.tokenizer, valid_set, result.valid_reference,
                                          beta=result.beta, micro_batch_tokens=config.micro_batch_tokens)  # fmt: skip
    result.model = None
    return _RunOutput(result, evaluation, train_set.prompts)


def _fetch_init_adapter(engine: Engine, store: ArtifactStore, model_name: str, work: Path) -> Path:
    """A local copy of the adapter of the fine-tuned model (or checkpoint) a continued job starts from.

    Raises:
        JobFailure: the model was deleted since the job was created.
    """
    with Session(engine) as session:
        row = session.exec(select(ModelRow).where(ModelRow.id == model_name)).first()
    if row is None or row.deleted or not store.exists(row.storage_key):
        raise JobFailure("invalid_model", f"Model {model_name}, which this job continues from, no longer exists",
                         "model")  # fmt: skip
    local = work / "init-adapter"
    shutil.copytree(store.path(row.storage_key), local)
    return local


def _work_root(settings: Settings) -> Path:
    root = settings.home_dir / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _max_seq_len(model_path: Path) -> int:
    config = json.loads((model_path / "config.json").read_text())
    return min(DEFAULT_MAX_SEQ_LEN, int(config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN))


def _load(
    job: JobRow, store: ArtifactStore, file_id: str, tokenization: Tokenization, engine: Engine,
    loader: Callable[[Any, Tokenization], Any] = load_dataset,
) -> Any:  # fmt: skip
    with Session(engine) as session:
        row = session.exec(select(FileRow).where(FileRow.id == file_id)).first()
    if row is None or row.deleted:
        param = "training_file" if file_id == job.training_file else "validation_file"
        raise JobFailure(f"invalid_{param}", f"File {file_id} no longer exists", param)
    with store.open(row.storage_key) as handle:
        dataset = loader(handle, tokenization)
    if dataset.truncated:
        add_event(engine, job.id, f"{dataset.truncated} example(s) of {file_id} are longer than "
                  f"{tokenization.max_seq_len} tokens and were truncated", level="warn")  # fmt: skip
    if dataset.no_labels:
        add_event(engine, job.id, f"{dataset.no_labels} example(s) of {file_id} have no trained tokens "
                  "(every assistant message has weight 0, or it was truncated away)", level="warn")  # fmt: skip
    return dataset


def _fetch_state(store: ArtifactStore, job_id: str, work: Path, tries: int = 3) -> Path | None:
    """A local copy of the job's newest resume state, or None when it has none."""
    key = state_key(job_id)
    local = work / "resume"
    for _ in range(tries):
        if not store.exists(key):
            return None
        try:
            shutil.copytree(store.path(key), local)
            return local
        except FileNotFoundError:  # a newer copy replaced the one being read (a predecessor's last write)
            shutil.rmtree(local, ignore_errors=True)
    raise RuntimeError(f"job {job_id}: the resume state kept changing while it was read")


async def _outcome(
    ctx: dict[str, Any], job: JobRow, callbacks: JobCallbacks, run: _RunOutput, model_name: str
) -> str:
    engine: Engine = ctx["engine"]
    result = run.result
    if result.stopped or callbacks.lost:  # checkpoints pruned on the way are gone, whatever happens next
        await _announce(ctx["redis"], job.id, deleted=callbacks.deleted_models, ready=[])
    if callbacks.lost:
        logger.warning("job %s: stopped at step %d; another worker holds the lease", job.id, result.step)
        return "lost"
    if result.stopped == "pause":
        await asyncio.to_thread(add_event, engine, job.id,
                                f"Training paused at step {result.step}/{result.total_steps}; state saved")  # fmt: skip
        return "paused"
    if result.stopped == "cancel":
        await asyncio.to_thread(add_event, engine, job.id,
                                f"Training stopped at step {result.step}/{result.total_steps}; checkpoints kept")  # fmt: skip
        return "cancelled"
    return await _finish(ctx, job, callbacks, run, model_name)


async def _finish(
    ctx: dict[str, Any], job: JobRow, callbacks: JobCallbacks, run: _RunOutput, model_name: str
) -> str:
    """Make the job `succeeded` with its model in one commit, then announce the adapters."""
    try:
        outcome = await asyncio.to_thread(
            _succeed, ctx["engine"], ctx["store"], job, callbacks, run, model_name
        )
    except FenceLost:
        logger.warning("job %s: finished training, but %s lost the lease", job.id, callbacks.held.owner)
        return "lost"
    if outcome == "succeeded":
        live = await asyncio.to_thread(artifacts.live_checkpoint_names, ctx["engine"], job.id)
        await _announce(ctx["redis"], job.id, deleted=callbacks.deleted_models, ready=[*live, model_name])
    return outcome


def _succeed(
    engine: Engine,
    store: ArtifactStore,
    job: JobRow,
    callbacks: JobCallbacks,
    run: _RunOutput,
    model_name: str,
) -> str:
    """The blocking part of finishing (a thread): adapter, result file, then the fenced `succeeded` commit.

    Returns:
        succeeded, or the outcome when another writer moved the job first (cancelled, failed, lost).

    Raises:
        FenceLost: the lease was lost before the adapter was stored.
    """
    held, result = callbacks.held, run.result
    assert result.adapter_dir is not None
    artifacts.put_final_adapter(engine, store, lease=held, adapter_dir=result.adapter_dir)
    result_file = artifacts.write_result_file(store, job=job, history=result.history)
    if lease.holds(engine, held):
        _save_drift_profile(store, job.id, run.prompts)

    stopping = _early_stopping(job, callbacks, result)

    def rows(session: Session) -> None:
        artifacts.final_rows(session, job=job, model_name=model_name, result_file=result_file)
        if stopping:
            session.add(job_event(job.id, stopping[0], data={"early_stopping": result.early_stopping}))
        session.add(_evaluation_event(job.id, run.evaluation))
        session.add(job_event(job.id, f"New fine-tuned model created: {model_name}"))

    try:
        transition(engine, job.id, JobStatus.succeeded, message="The job has successfully completed",
                   expect=JobStatus.running, where=held.columns, also=rows, fine_tuned_model=model_name,
                   result_files=[result_file.id], trained_tokens=result.trained_tokens, evaluation=run.evaluation,
                   estimated_finish=None, step=result.step, **(stopping[1] if stopping else {}))  # fmt: skip
    except IllegalTransition:
        store.delete(result_file.storage_key)
        return _not_succeeded(engine, store, job)
    store.delete(state_key(job.id))
    return "succeeded"


def _early_stopping(job: JobRow, callbacks: JobCallbacks, result: TrainResult) -> tuple[str, dict] | None:
    """The event text and the `hyperparameters` column (with what early stopping did) of a job that had it on."""
    report, asked = result.early_stopping, callbacks.spec.early_stopping
    if report is None or asked is None:
        return None
    best = f"the fine-tuned model has the weights of step {report['best_step']} (full validation loss " \
           f"{report['best_valid_loss']:.3f})"  # fmt: skip
    if report["stopped_at_step"] is not None:
        text = (f"Early stopping at step {report['stopped_at_step']}/{result.total_steps}: the validation loss did "
                f"not improve for {asked.patience} evaluations; {best}")  # fmt: skip
    else:
        text = f"Early stopping did not stop the run; {best}"
    columns = callbacks.spec.resolved_columns(result.hyperparameters)
    columns["hyperparameters"]["early_stopping"] = asked.as_dict() | report
    logger.info("job %s: %s", job.id, text)
    return text, {"hyperparameters": columns["hyperparameters"]}


def _not_succeeded(engine: Engine, store: ArtifactStore, job: JobRow) -> str:
    """The job moved before it could succeed: a cancel or failure won (its final adapter is dropped; nothing
    will be trained again), or another worker took the lease (its adapter stays)."""
    status, owner = lease.owner_of(engine, job.id)
    logger.warning("job %s: finished training but it is %s now (lease %s)", job.id, status, owner)
    if status in {JobStatus.cancelled, JobStatus.failed}:
        store.delete(adapter_key(job.id))
        return "cancelled" if status == JobStatus.cancelled else "failed"
    return "lost"


def _evaluation_event(job_id: str, evaluation: dict[str, Any] | None) -> JobEventRow:
    if evaluation is None:
        return job_event(job_id, "No validation file; the final evaluation was skipped")
    return job_event(job_id, _evaluation_message(evaluation), data={"evaluation": evaluation})


async def _announce(redis: Any, job_id: str, *, deleted: list[str], ready: list[str]) -> None:
    """Tell the serve processes about the job's adapters. The change is durable already: a publish that fails
    is logged, and the serve process's sweep of the model table catches up."""
    messages = [("deleted", name) for name in deleted] + [("ready", name) for name in ready]
    for event, name in messages:
        try:
            await asyncio.wait_for(publish_adapter_event(redis, event, name), PUBLISH_TIMEOUT_SECONDS)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001  Redis down or slow: never undo a success for a notification
            logger.warning("job %s: cannot publish %s for %s", job_id, event, name, exc_info=True)


def _evaluation_message(evaluation: dict[str, Any]) -> str:
    if "preference_accuracy" in evaluation:
        return (f"Evaluation on the validation file: DPO loss={evaluation['loss']:.3f}, preference accuracy="
                f"{evaluation['preference_accuracy']:.3f}, reward margin={evaluation['reward_margin']:.3f}")  # fmt: skip
    parts = [f"loss={evaluation['loss']:.3f}", f"perplexity={evaluation['perplexity']:.2f}",
             f"token accuracy={evaluation['token_accuracy']:.3f}"]  # fmt: skip
    if evaluation.get("exact_match") is not None:
        parts.append(f"exact match={evaluation['exact_match']:.3f}")
        parts.append(f"character error rate={evaluation['character_error_rate']:.3f}")
    if evaluation.get("macro_f1") is not None:
        parts.append(
            f"label accuracy={evaluation['label_accuracy']:.3f}, macro-F1={evaluation['macro_f1']:.3f}"
        )
    return "Evaluation on the validation file: " + ", ".join(parts)


def _save_drift_profile(store: ArtifactStore, job_id: str, prompts: list[str]) -> None:
    if not any(prompts):
        return
    try:
        drift_profile.save_profile(store, job_id, prompts)
    except Exception:  # noqa: BLE001  the drift profile is optional; the model is what matters
        logger.exception("job %s: cannot build the drift profile", job_id)
