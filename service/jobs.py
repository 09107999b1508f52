"""Fine-tuning jobs: creation (checked synchronously, then handed to the worker), listing, state changes, events
and checkpoints.

A new job is committed together with its first events, and only then enqueued; when Redis is down the job stays
in `validating_files` and the worker's reconciler enqueues it later. Every status change goes through
`core.job_status.transition`.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core import base_models, metrics, queue
from core.failures import JobFailure
from core.ids import new_id
from core.job_spec import EARLY_STOPPING, HYPERPARAMETER_KEYS, INIT_FROM, JobSpec, LoraSpec
from core.job_status import TERMINAL, IllegalTransition, JobStatus, transition
from core.settings import Settings
from core.tables import CheckpointRow, FileRow, JobEventRow, JobRow, ModelRow, Project
from service import checkpoint_permissions, files, idempotency
from service.errors import InvalidRequest, RateLimited, not_found
from service.protocol import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreateRequest,
    JobError,
)

logger = logging.getLogger(__name__)

S = JobStatus
JOB_ID_PARAM = "fine_tuning_job_id"
QUOTA_RETRY_AFTER = 5  # seconds: the SDK retries a 429 after `retry-after`, twice, then raises RateLimitError


# --- wire shapes -------------------------------------------------------------------------------------------
def to_openai(row: JobRow) -> FineTuningJob:
    hyperparameters = row.hyperparameters or {}
    return FineTuningJob(
        id=row.id,
        created_at=row.created_at,
        error=_error(row.error),
        fine_tuned_model=row.fine_tuned_model,
        finished_at=row.finished_at,
        hyperparameters={key: hyperparameters.get(key, "auto") for key in HYPERPARAMETER_KEYS},
        model=(row.lora or {}).get(INIT_FROM) or row.model,  # a continued job: the model it started from
        organization_id=row.project_id,
        result_files=list(row.result_files or []),
        seed=row.seed,
        status=row.status,
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        estimated_finish=row.estimated_finish,
        integrations=row.integrations,
        metadata=row.metadata_ or None,
        method=row.method,
        user_provided_suffix=row.suffix,
        evaluation=row.evaluation,
        lora=row.lora or {},
        early_stopping=hyperparameters.get(EARLY_STOPPING),
    )


def _error(error: dict | None) -> JobError | None:
    if not error:
        return None
    return JobError(code=str(error.get("code") or "internal_error"), message=str(error.get("message", "")),
                    param=error.get("param"))  # fmt: skip


def event_to_openai(row: JobEventRow) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=row.id,
        created_at=row.created_at,
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data,
    )


def checkpoint_to_openai(row: CheckpointRow) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=row.id,
        created_at=row.created_at,
        fine_tuned_model_checkpoint=row.fine_tuned_model_checkpoint,
        fine_tuning_job_id=row.job_id,
        metrics=row.metrics or {},
        step_number=row.step_number,
    )


# --- create ------------------------------------------------------------------------------------------------
def create(
    *,
    engine: Engine,
    settings: Settings,
    project: Project,
    request: JobCreateRequest,
    idempotency_key: str | None = None,
) -> tuple[JobRow, bool]:
    """Check a create request and commit the job (`validating_files`) with its first events.

    Args:
        engine: the database.
        settings: for the base model registry.
        project: the caller's project (owner of the job and of its files).
        request: the parsed body.
        idempotency_key: the request's `Idempotency-Key`; a repeated key returns the job it created.

    Returns:
        The job row and whether it is new (the caller enqueues a new one).

    Raises:
        InvalidRequest: unknown model, unusable file, unsupported method, conflicting hyperparameters.
        RateLimited: the project has `max_active_jobs_per_project` unfinished jobs already.
    """
    start = start_model(engine=engine, settings=settings, project_id=project.id, model=request.model)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    spec = job_spec(settings, request, seed, start)
    key = idempotency.check_key(idempotency_key)
    with Session(engine, expire_on_commit=False) as session:
        earlier = idempotency.find(session, project_id=project.id, kind="job", key=key)
        if earlier is not None:
            return get_row(session=session, project_id=project.id, job_id=earlier), False
        _check_file(session, project.id, request.training_file, param="training_file", method=spec.method)
        if request.validation_file is not None:
            _check_file(
                session, project.id, request.validation_file, param="validation_file", method=spec.method
            )
        _check_quota(session, project.id, settings.max_active_jobs_per_project)
        job = _new_row(project, request, spec, start.base_model)
        job.queue_token = queue.new_token(queue.VALIDATE_JOB, job.id)  # committed with the job: one write
        if not _insert(session, job, key):
            winner = idempotency.find(session, project_id=project.id, kind="job", key=key)
            return get_row(session=session, project_id=project.id, job_id=str(winner)), False
    metrics.JOBS_CREATED.labels(base_model=job.model).inc()
    logger.info("job %s: created for project %s, model %s", job.id, project.name, job.model)
    return job, True


@dataclass(frozen=True)
class StartModel:
    """What a new job starts from: a base model, or a fine-tuned model / checkpoint whose adapter it continues."""

    base_model: str
    init_from: str | None = None  # the fine-tuned model (or checkpoint) name; None: a fresh adapter
    lora: dict[str, Any] = field(default_factory=dict)  # its adapter's rank, alpha and target modules


def start_model(*, engine: Engine, settings: Settings, project_id: str, model: str) -> StartModel:
    """Resolve a create request's `model`: a registered base model, or (continued training) a live fine-tuned
    model or checkpoint of the project, or a checkpoint another project granted it (`checkpoint_permissions`).

    Raises:
        InvalidRequest: an unknown base model, a fine-tuned model the project cannot use, or one whose base
            model is no longer registered (`param: model`).
    """
    if not model.startswith("ft:"):
        _check_model(settings, model)
        return StartModel(model)
    with Session(engine) as session:
        row = session.exec(
            select(ModelRow).where(ModelRow.id == model, col(ModelRow.deleted).is_(False))
        ).first()
        usable = row is not None and (
            row.project_id == project_id
            or (row.checkpoint_step is not None
                and checkpoint_permissions.granted(session, checkpoint=model, project_id=project_id))
        )  # fmt: skip
        source = (
            session.exec(select(JobRow).where(JobRow.id == row.job_id)).first() if row and usable else None
        )
    if row is None or source is None:
        raise InvalidRequest(f"Model {model!r} does not exist or you do not have access to it.", param="model",
                             code="model_not_available")  # fmt: skip
    _check_model(settings, row.base_model)
    lora = LoraSpec.of(source.lora)
    kept = {"rank": lora.rank, "alpha": lora.alpha}
    return StartModel(row.base_model, model, kept | ({"target_modules": list(lora.target_modules)}
                                                      if lora.target_modules else {}))  # fmt: skip


def _continued_lora(start: StartModel, asked: dict[str, Any] | None) -> dict[str, Any] | None:
    """A continued job's `lora`: its start adapter's shape; asked keys that would change it are refused.

    Raises:
        InvalidRequest: `lora.rank`, `lora.alpha` or `lora.target_modules` differ from the start adapter's.
    """
    if start.init_from is None:
        return asked
    asked = dict(asked or {})
    for key in ("rank", "alpha", "target_modules"):
        if key in asked and asked[key] != start.lora.get(key):
            have = start.lora.get(key, "every attention and MLP projection")
            raise InvalidRequest(f"`lora.{key}` must match the adapter of {start.init_from} ({have}) to continue "
                                 "training from it; leave it out.", param=f"lora.{key}")  # fmt: skip
    return asked | start.lora


def _check_model(settings: Settings, model: str) -> None:
    if base_models.get(settings, model) is None:
        known = ", ".join(base_models.known_ids(settings))
        raise InvalidRequest(
            f"Model {model!r} is not available for fine-tuning. Available models: {known}.",
            param="model",
            code="model_not_available",
        )


def _check_quota(session: Session, project_id: str, limit: int) -> None:
    """Refuse a new job while the project has `limit` unfinished ones (0 = no limit). Checked, not locked: two
    concurrent creates may both pass at `limit - 1`."""
    if not limit:
        return
    active = session.exec(
        select(func.count()).where(  # type: ignore[call-overload]
            JobRow.project_id == project_id, col(JobRow.status).not_in([s.value for s in TERMINAL])
        )
    ).one()
    if int(active) >= limit:
        raise RateLimited(
            f"This project has {active} unfinished fine-tuning jobs, the most it may have at once ({limit}). "
            "Wait for one to finish or cancel one.",
            code="too_many_active_jobs",
            headers={"retry-after": str(QUOTA_RETRY_AFTER)},
        )


def _insert(session: Session, job: JobRow, key: str | None) -> bool:
    """Commit the job with its first events; False when a concurrent request with the same key won."""
    session.add(job)
    session.add_all(_first_events(job))
    idempotency.record(session, project_id=job.project_id, kind="job", key=key, object_id=job.id)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True


def job_spec(
    settings: Settings, request: JobCreateRequest, seed: int, start: StartModel | None = None
) -> JobSpec:
    """The request's job spec (the one interpretation of method, hyperparameters, `lora` and `early_stopping`).

    Raises:
        InvalidRequest: unsupported `method.type`, conflicting hyperparameters, a LoRA rank too large to serve,
            `lora` that conflicts with the adapter a continued job starts from, early stopping without a
            validation file.
    """
    start = start or StartModel(request.model)
    lora = _continued_lora(start, request.lora.model_dump(exclude_none=True) if request.lora else None)
    try:
        return JobSpec.from_request(
            method=request.method.model_dump() if request.method else None,
            hyperparameters=request.hyperparameters.model_dump() if request.hyperparameters else None,
            lora=lora,
            seed=seed,
            max_lora_rank=settings.vllm_max_lora_rank,
            early_stopping=request.early_stopping.model_dump() if request.early_stopping else None,
            has_validation_file=request.validation_file is not None,
            init_from=start.init_from,
        )
    except JobFailure as exc:
        raise InvalidRequest(exc.message, param=exc.param) from exc


def _check_file(
    session: Session, project_id: str, file_id: str, *, param: str, method: str = "supervised"
) -> FileRow:
    statement = select(FileRow).where(FileRow.id == file_id, *files.visible(project_id))
    row = session.exec(statement).first()
    if row is None:
        raise InvalidRequest(f"Invalid file ID: {file_id} (no such file).", param=param, code="invalid_file")
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"File {file_id} has purpose {row.purpose!r}; fine-tuning needs purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    if row.data_format and (row.data_format == "preference") != (method == "dpo"):
        wanted = "preference examples" if method == "dpo" else "chat or prompt/completion examples"
        raise InvalidRequest(f"File {file_id} has {row.data_format} examples; a {method} job trains on {wanted}.",
                             param=param, code="invalid_file_format")  # fmt: skip
    return row


def _new_row(project: Project, request: JobCreateRequest, spec: JobSpec, base_model: str) -> JobRow:
    return JobRow(
        id=new_id("ftjob-"),
        project_id=project.id,
        model=base_model,
        status=S.validating_files.value,
        **spec.columns(),
        seed=spec.seed,
        training_file=request.training_file,
        validation_file=request.validation_file,
        integrations=[i.model_dump(exclude_none=True) for i in request.integrations]
        if request.integrations
        else None,
        metadata_=request.metadata or None,
        suffix=request.suffix,
    )


def _first_events(job: JobRow) -> list[JobEventRow]:
    events = [
        JobEventRow(id=new_id("ftevent-"), job_id=job.id, message="Created fine-tuning job"),
        JobEventRow(
            id=new_id("ftevent-"), job_id=job.id, message=f"Validating training file: {job.training_file}"
        ),
    ]
    if job.integrations:
        text = "Integrations (wandb) are stored but not run: this deployment has no Weights & Biases access"
        events.append(JobEventRow(id=new_id("ftevent-"), job_id=job.id, level="warn", message=text))
    return events


async def enqueue(
    *, engine: Engine, redis: ArqRedis | None, settings: Settings, function: str, job_id: str,
    token: str | None = None,
) -> bool:  # fmt: skip
    """Push a committed job to the queue (under `token` when it was committed with the job); when Redis is down,
    log it and leave it to the reconciler.

    Returns:
        True when the job was pushed.
    """
    if redis is None:
        logger.warning("job %s: redis is down; %s left to the reconciler", job_id, function)
        return False
    try:
        await queue.enqueue(engine, redis, function=function, job_id=job_id, queue_name=settings.queue_name,
                            token=token)  # fmt: skip
    except Exception as exc:
        logger.warning("job %s: enqueue of %s failed (%s); left to the reconciler", job_id, function, exc)
        return False
    return True


# --- one job (the hot read paths are in `service.job_reads`) ------------------------------------------------
def get_row(*, session: Session, project_id: str, job_id: str, param: str = JOB_ID_PARAM) -> JobRow:
    """The project's job `job_id`.

    Raises:
        NotFound: no such job in this project.
    """
    row = session.exec(select(JobRow).where(JobRow.id == job_id, JobRow.project_id == project_id)).first()
    if row is None:
        raise not_found("fine-tuning job", job_id, param=param)
    return row


# --- state changes -----------------------------------------------------------------------------------------
def cancel(*, engine: Engine, project_id: str, job_id: str) -> JobRow:
    """Cancel a job that has not finished (the worker stops at the next step and frees its resources).

    Raises:
        NotFound: no such job in this project.
        InvalidRequest: the job has already finished.
    """
    return _move(engine, project_id, job_id, S.cancelled, "Fine-tuning job cancelled", verb="cancelled")


def pause(*, engine: Engine, project_id: str, job_id: str) -> JobRow:
    """Pause a queued or running job (the worker saves resume state at the next step).

    Raises:
        NotFound: no such job in this project.
        InvalidRequest: the job is not queued or running.
    """
    return _move(
        engine,
        project_id,
        job_id,
        S.paused,
        "Fine-tuning job paused",
        verb="paused",
        allowed={S.queued, S.running},
    )


def resume(*, engine: Engine, project_id: str, job_id: str) -> JobRow:
    """Queue a paused job again; the caller enqueues it for training (it continues from its resume state).

    Raises:
        NotFound: no such job in this project.
        InvalidRequest: the job is not paused.
    """
    return _move(
        engine, project_id, job_id, S.queued, "Fine-tuning job resumed", verb="resumed", allowed={S.paused}
    )


def _move(
    engine: Engine, project_id: str, job_id: str, target: JobStatus, message: str, *, verb: str,
    allowed: set[JobStatus] | None = None,
) -> JobRow:  # fmt: skip
    for _ in range(3):  # a concurrent writer (the worker) may move the job between our read and our write
        with Session(engine) as session:
            current = S(get_row(session=session, project_id=project_id, job_id=job_id).status)
        _check_move(job_id, current, target, verb=verb, allowed=allowed)
        try:
            return transition(engine, job_id, target, message=message, expect=current)
        except IllegalTransition:
            continue
    raise InvalidRequest(f"Job {job_id} is changing state; try again.", param=JOB_ID_PARAM)


def _check_move(
    job_id: str, current: JobStatus, target: JobStatus, *, verb: str, allowed: set[JobStatus] | None
) -> None:
    if current in TERMINAL:
        raise InvalidRequest(
            f"Job has already completed: {job_id} (status: {current.value})", param=JOB_ID_PARAM
        )
    if (allowed is not None and current not in allowed) or current == target:
        raise InvalidRequest(
            f"Job {job_id} cannot be {verb} from status {current.value}.", param=JOB_ID_PARAM
        )
