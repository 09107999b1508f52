"""The `validate_job` queue function: check a job's files with the base model's tokenizer, then queue it.

The API validated the files' syntax at upload; here they are validated again as the trainer will read them
(token counts with the base model's tokenizer), and the job fails with OpenAI's error codes
(`invalid_n_examples`, `invalid_training_file`, ..., `unsupported_model`) naming the line.

Validation always ends: any other error fails the job with `validation_failed`, and every start is counted on
the row (`attempts`, durable before the work) so that a validation that keeps being interrupted (arq's timeout,
a killed worker) fails with `too_many_attempts` instead of being enqueued again by the reconciler forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.failures import JobFailure
from core.job_spec import JobSpec
from core.job_status import IllegalTransition, JobStatus, add_event, transition
from core.queue import TRAIN_JOB, enqueue
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import FileRow, JobRow
from runner.datasets import Tokenization

logger = logging.getLogger(__name__)


async def validate_job(ctx: dict[str, Any], job_id: str) -> str:
    """arq function: validate job `job_id`'s files; `failed` with an error, or `queued` and TRAIN_JOB enqueued.

    Returns:
        skipped (not in validating_files), failed or queued.
    """
    settings: Settings = ctx["settings"]
    engine: Engine = ctx["engine"]
    job = await asyncio.to_thread(_start, engine, job_id)
    if job is None:
        return "skipped"
    if job.attempts > settings.job_max_attempts:
        message = (f"Validating the files was interrupted {job.attempts - 1} times "
                   f"(the limit is {settings.job_max_attempts})")  # fmt: skip
        return _fail(engine, job_id, JobFailure("too_many_attempts", message))
    try:
        await asyncio.to_thread(_check, settings, engine, ctx["store"], job)
    except JobFailure as exc:
        return _fail(engine, job_id, exc)
    except Exception as exc:  # noqa: BLE001  a bug or a broken file must fail the job, not retry it forever
        logger.exception("job %s: validation failed", job_id)
        text = str(exc) or type(exc).__name__
        message = f"Validating the files failed: {type(exc).__name__}: {text[:500]}"
        return _fail(engine, job_id, JobFailure("validation_failed", message))
    try:
        transition(engine, job_id, JobStatus.queued, message="Files validated, moving job to queued state",
                   expect=JobStatus.validating_files, attempts=0)  # fmt: skip
    except IllegalTransition:
        return "skipped"
    await enqueue(engine, ctx["redis"], function=TRAIN_JOB, job_id=job_id, queue_name=settings.queue_name)
    return "queued"


def _start(engine: Engine, job_id: str) -> JobRow | None:
    """Count a validation attempt (committed before any work); None when the job is not in validating_files."""
    with Session(engine, expire_on_commit=False) as session:
        result = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == JobStatus.validating_files.value)  # type: ignore[arg-type]
            .values(attempts=JobRow.attempts + 1)
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.exec(select(JobRow).where(JobRow.id == job_id)).one()


def _fail(engine: Engine, job_id: str, failure: JobFailure) -> str:
    try:
        transition(engine, job_id, JobStatus.failed, message=failure.message, level="error",
                   expect=JobStatus.validating_files, error=failure.as_error())  # fmt: skip
    except IllegalTransition:
        return "skipped"
    return "failed"


def _check(settings: Settings, engine: Engine, store: ArtifactStore, job: JobRow) -> None:
    from transformers import AutoTokenizer

    from core.training_files import validate_jsonl
    from core.weights import UnknownModel, ensure_prepared

    try:
        base = ensure_prepared(settings, job.model)
    except (UnknownModel, FileNotFoundError) as exc:
        message = f"Model {job.model} is not available for fine-tuning"
        raise JobFailure("unsupported_model", message, "model") from exc
    spec = JobSpec.from_row(job)  # a method this worker cannot train fails now, not after the files were read
    tokenization = Tokenization(AutoTokenizer.from_pretrained(base.path))
    count_tokens = _token_counter(tokenization)
    files = [("training_file", job.training_file, settings.min_examples)]
    if job.validation_file:
        files.append(("validation_file", job.validation_file, 1))
    for param, file_id, minimum in files:
        row = _file(engine, file_id, job.project_id)
        if row is None:
            raise JobFailure(f"invalid_{param}", f"File {file_id} does not exist", param)
        with store.open(row.storage_key) as handle:
            report = validate_jsonl(handle, count_tokens=count_tokens, max_tokens=tokenization.max_seq_len)
        error = report.job_error(param=param, min_examples=minimum)
        if error is not None:
            raise JobFailure.from_error(error)
        _check_format(spec.method, report.format, param)
        if report.too_long:
            add_event(engine, job.id, f"{report.too_long} example(s) of {file_id} exceed {tokenization.max_seq_len} "
                      "tokens and will be truncated", level="warn")  # fmt: skip
        logger.info("job %s: %s %s ok: %s", job.id, param, file_id, report.summary())


def _token_counter(tokenization: Tokenization) -> Callable[[dict], int]:
    """Tokens of one example as it is trained: preference pairs by their longer sequence."""
    from core.training_files import PREFERENCE, detect_format
    from runner import preference

    def count(example: dict) -> int:
        if detect_format(example) == PREFERENCE:
            return preference.count_tokens(tokenization, example)
        return tokenization.count_tokens(example)

    return count


def _check_format(method: str, data_format: str | None, param: str) -> None:
    """DPO trains on preference files only; supervised on chat and prompt/completion files only."""
    if method == "dpo" and data_format not in (None, "preference"):
        message = (f"A DPO job needs preference examples (`input`, `preferred_output`, `non_preferred_output`); "
                   f"the {param} has {data_format} examples")  # fmt: skip
        raise JobFailure(f"invalid_{param}", message, param)
    if method != "dpo" and data_format == "preference":
        message = "Preference (DPO) files are trained with `method.type: dpo`; use chat or prompt/completion examples"
        raise JobFailure(f"invalid_{param}", message, param)


def _file(engine: Engine, file_id: str, project_id: str) -> FileRow | None:
    with Session(engine) as session:
        row = session.exec(
            select(FileRow).where(FileRow.id == file_id, FileRow.project_id == project_id)
        ).first()
    return None if row is None or row.deleted else row
