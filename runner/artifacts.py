"""What a training job leaves behind: checkpoints, the final model, the result file, in the store and the database.

Every writer here is idempotent by job and step, because a job may be trained twice up to the same point (a
worker that crashed after a checkpoint but before its resume state): the rows are updated, never duplicated.
Store keys: `jobs/<id>/checkpoints/step-<N>`, `jobs/<id>/adapter`, `jobs/<id>/state`, `files/<file id>`.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.ids import new_id
from core.naming import checkpoint_model_name
from core.storage import ArtifactStore
from core.store_keys import adapter_key, checkpoint_key, file_key
from core.tables import CheckpointRow, FileRow, JobRow, ModelRow, Project

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def project_name(engine: Engine, project_id: str) -> str:
    """The name of project `project_id` (what fine-tuned model names carry); the id when it has no row."""
    with Session(engine) as session:
        project = session.exec(select(Project).where(Project.id == project_id)).first()
        return project.name if project else project_id


def save_checkpoint(
    engine: Engine,
    store: ArtifactStore,
    *,
    job: JobRow,
    model_name: str,
    step: int,
    adapter_dir: Path,
    metrics: dict,
) -> str:
    """Store an epoch checkpoint and register it (CheckpointRow + a servable ModelRow). Returns its model name.

    Args:
        engine: the database.
        store: the artifact store.
        job: the job it belongs to.
        model_name: the final model's name; the checkpoint's is derived from it.
        step: the optimizer step of the checkpoint.
        adapter_dir: the adapter in PEFT format.
        metrics: the step's metrics (checkpoint `metrics`).
    """
    key = checkpoint_key(job.id, step)
    store.put_dir(key, adapter_dir)
    name = checkpoint_model_name(model_name, step)
    values = {k: float(metrics[k]) for k in CHECKPOINT_METRICS if metrics.get(k) is not None}
    with Session(engine, expire_on_commit=False) as session:
        row = session.exec(
            select(CheckpointRow).where(CheckpointRow.job_id == job.id, CheckpointRow.step_number == step)
        ).first()
        if row is None:
            row = CheckpointRow(
                id=new_id("ftckpt-"), job_id=job.id, project_id=job.project_id, step_number=step,
                fine_tuned_model_checkpoint=name, storage_key=key,
            )  # fmt: skip
        row.metrics, row.deleted = values, False
        session.add(row)
        session.add(_model_row(session, name, job=job, storage_key=key, step=step))
        session.commit()
    return name


def _model_row(session: Session, name: str, *, job: JobRow, storage_key: str, step: int | None) -> ModelRow:
    row = session.exec(select(ModelRow).where(ModelRow.id == name)).first()
    if row is None:
        row = ModelRow(
            id=name, project_id=job.project_id, job_id=job.id, base_model=job.model, storage_key=storage_key
        )
    row.storage_key, row.checkpoint_step, row.deleted = storage_key, step, False
    return row


def prune_checkpoints(engine: Engine, store: ArtifactStore, *, job_id: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a job; returns the model names that were deleted."""
    with Session(engine, expire_on_commit=False) as session:
        rows = session.exec(
            select(CheckpointRow)
            .where(CheckpointRow.job_id == job_id, CheckpointRow.deleted == False)  # noqa: E712
            .order_by(CheckpointRow.step_number.desc())  # type: ignore[attr-defined]
        ).all()
        dropped = list(rows[keep:])
        for row in dropped:
            row.deleted = True
            session.add(row)
            model = session.exec(
                select(ModelRow).where(ModelRow.id == row.fine_tuned_model_checkpoint)
            ).first()
            if model is not None:
                model.deleted = True
                session.add(model)
        session.commit()
    for row in dropped:
        store.delete(row.storage_key)
        logger.info("job %s: deleted checkpoint at step %d", job_id, row.step_number)
    return [row.fine_tuned_model_checkpoint for row in dropped]


def live_checkpoint_names(engine: Engine, job_id: str) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(CheckpointRow).where(CheckpointRow.job_id == job_id, CheckpointRow.deleted == False)  # noqa: E712
        ).all()
        return [row.fine_tuned_model_checkpoint for row in rows]


def save_final_model(
    engine: Engine, store: ArtifactStore, *, job: JobRow, model_name: str, adapter_dir: Path
) -> None:
    """Store the final adapter under `jobs/<id>/adapter` and register its ModelRow (one per job, ever)."""
    store.put_dir(adapter_key(job.id), adapter_dir)
    with Session(engine) as session:
        session.add(_model_row(session, model_name, job=job, storage_key=adapter_key(job.id), step=None))
        session.commit()


def result_csv(history: list[dict[str, Any]]) -> bytes:
    """The step metrics as OpenAI's result CSV (one row per step; the newest row wins when steps repeat)."""
    by_step = {int(m["step"]): m for m in history}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for step in sorted(by_step):
        m = by_step[step]
        row = [
            step,
            m.get("train_loss"),
            m.get("train_mean_token_accuracy"),
            m.get("valid_loss"),
            m.get("valid_mean_token_accuracy"),
        ]
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return out.getvalue().encode()


def save_result_file(
    engine: Engine, store: ArtifactStore, *, job: JobRow, history: list[dict[str, Any]]
) -> str:
    """Write the result CSV as a `fine-tune-results` file of the job's project; returns the file id."""
    data = result_csv(history)
    file_id = new_id("file-")
    key = file_key(file_id)
    store.write_bytes(key, data)
    with Session(engine) as session:
        session.add(
            FileRow(
                id=file_id,
                project_id=job.project_id,
                bytes=len(data),
                filename="step_metrics.csv",
                purpose="fine-tune-results",
                status="processed",
                storage_key=key,
            )  # fmt: skip
        )
        session.commit()
    return file_id
