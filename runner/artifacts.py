"""What a training job leaves behind: checkpoints, the final model, the result file, in the store and the database.

Every writer here is idempotent by job and step, because a job may be trained twice up to the same point (a
worker that crashed after a checkpoint but before its resume state): the rows are updated, never duplicated.
Every write is fenced by the attempt's lease (`runner.lease`), so a worker that lost it changes nothing. The
final model and result file rows are not committed here: `final_rows` adds them to the transaction that moves
the job to `succeeded`, so a model is listed exactly when its job succeeded.
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
from runner.lease import Lease, fenced_session

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
    lease: Lease,
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
        lease: the attempt's lease; the folder and the rows are written only while it is held.
        model_name: the final model's name; the checkpoint's is derived from it.
        step: the optimizer step of the checkpoint.
        adapter_dir: the adapter in PEFT format.
        metrics: the step's metrics (checkpoint `metrics`).

    Raises:
        FenceLost, LeaseLost: another attempt holds the lease.
    """
    key = checkpoint_key(job.id, step)
    store.put_dir(key, adapter_dir, fence=lease.fence(engine))
    name = checkpoint_model_name(model_name, step)
    values = {k: float(metrics[k]) for k in CHECKPOINT_METRICS if metrics.get(k) is not None}
    with fenced_session(engine, lease) as session:
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
    return name


def _model_row(session: Session, name: str, *, job: JobRow, storage_key: str, step: int | None) -> ModelRow:
    row = session.exec(select(ModelRow).where(ModelRow.id == name)).first()
    if row is None:
        row = ModelRow(
            id=name, project_id=job.project_id, job_id=job.id, base_model=job.model, storage_key=storage_key
        )
    row.storage_key, row.checkpoint_step, row.deleted = storage_key, step, False
    return row


def prune_checkpoints(engine: Engine, store: ArtifactStore, *, lease: Lease, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a job; returns the model names that were deleted.

    Raises:
        LeaseLost: another attempt holds the lease (nothing is deleted).
    """
    job_id = lease.job_id
    with fenced_session(engine, lease) as session:
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


def put_final_adapter(engine: Engine, store: ArtifactStore, *, lease: Lease, adapter_dir: Path) -> str:
    """Store the final adapter under `jobs/<id>/adapter` while `lease` is held; returns the key.

    Raises:
        FenceLost: another attempt holds the lease; the folder is unchanged.
    """
    key = adapter_key(lease.job_id)
    store.put_dir(key, adapter_dir, fence=lease.fence(engine))
    return key


def final_rows(session: Session, *, job: JobRow, model_name: str, result_file: FileRow) -> None:
    """Add the final ModelRow (one per job, ever) and the result file's row to `session`: the transaction
    that moves the job to `succeeded` (`transition(also=...)`)."""
    session.add(_model_row(session, model_name, job=job, storage_key=adapter_key(job.id), step=None))
    session.add(result_file)


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


def write_result_file(store: ArtifactStore, *, job: JobRow, history: list[dict[str, Any]]) -> FileRow:
    """Store the result CSV under a new file id; returns its `fine-tune-results` row, not yet committed (the
    caller commits it with the job's success, or deletes the stored bytes)."""
    data = result_csv(history)
    file_id = new_id("file-")
    key = file_key(file_id)
    store.write_bytes(key, data)
    return FileRow(id=file_id, project_id=job.project_id, bytes=len(data), filename="step_metrics.csv",
                   purpose="fine-tune-results", status="processed", storage_key=key)  # fmt: skip
