"""Database rows (SQLModel). Wire shapes live in `protocol.py`; `to_openai()` functions map one to the other.

Every table has an integer `pk` that grows with insertion order: cursors (`after=`) and "newest first" listings
order by it, which is exact where `created_at` (whole seconds) ties.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from core.ids import now


def _json(default: Any = None) -> Any:
    return Field(default_factory=lambda: default() if callable(default) else default, sa_column=Column(JSON))


class Project(SQLModel, table=True):
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "proj_…"
    name: str = Field(index=True, unique=True)
    created_at: int = Field(default_factory=now)


class ApiKey(SQLModel, table=True):
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "key_…"
    project_id: str = Field(index=True)
    key_hash: str = Field(index=True, unique=True)  # sha256 of the secret; the secret is never stored
    prefix: str  # first characters of the key, to tell keys apart in listings
    created_at: int = Field(default_factory=now)
    revoked_at: int | None = None


class FileRow(SQLModel, table=True):
    __tablename__ = "file"
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "file-…"
    project_id: str = Field(index=True)
    bytes: int = 0
    created_at: int = Field(default_factory=now)
    filename: str
    purpose: str = Field(index=True)
    status: str = "uploaded"  # uploaded | processed | error
    status_details: str | None = None
    expires_at: int | None = None
    storage_key: str  # key in the artifact store
    data_format: str | None = None  # chat | completion | preference (training files)
    n_examples: int | None = None
    deleted: bool = Field(default=False, index=True)


class JobRow(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (Index("ix_job_project_pk", "project_id", "pk"),)
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "ftjob-…"
    project_id: str = Field(index=True)
    created_at: int = Field(default_factory=now)
    model: str
    status: str = Field(index=True)
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    started_at: int | None = None
    error: dict | None = _json(None)
    hyperparameters: dict = _json(
        dict
    )  # what the user asked for ("auto" or numbers), then the resolved values
    method: dict = _json(dict)
    lora: dict = _json(dict)  # extension: rank, alpha, dropout, target_modules
    result_files: list = _json(list)
    seed: int = 0
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list | None = _json(None)
    metadata_: dict | None = Field(default=None, sa_column=Column("metadata", JSON))
    suffix: str | None = None
    evaluation: dict | None = _json(None)  # extension: metrics on the validation data at the end
    # Consecutive attempts (validation or training) that ended without progress; reset when an attempt saves
    # resume state past where it started or ends on purpose. Over `job_max_attempts`: `too_many_attempts`.
    attempts: int = 0
    queue_token: str | None = (
        None  # arq job id of the latest enqueue (the reconciler checks it is still there)
    )
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    lease_epoch: int = 0  # leases taken so far; with `lease_owner` the fencing token of a worker's writes
    step: int = 0  # last completed optimizer step
    total_steps: int | None = None


class JobEventRow(SQLModel, table=True):
    __tablename__ = "job_event"
    __table_args__ = (Index("ix_job_event_job_pk", "job_id", "pk"),)
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "ftevent-…"
    job_id: str
    created_at: int = Field(default_factory=now)
    level: str = "info"  # info | warn | error
    message: str
    type: str = "message"  # message | metrics
    data: dict | None = _json(None)


class CheckpointRow(SQLModel, table=True):
    __tablename__ = "checkpoint"
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "ftckpt-…"
    job_id: str = Field(index=True)
    project_id: str = Field(index=True)
    created_at: int = Field(default_factory=now)
    step_number: int
    metrics: dict = _json(dict)
    fine_tuned_model_checkpoint: str = Field(index=True)
    storage_key: str
    deleted: bool = False


class ModelRow(SQLModel, table=True):
    """A servable fine-tuned model: a job's final adapter or one of its checkpoints."""

    __tablename__ = "model"
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "ft:{base}:{project}:{suffix}:{job}" (+ ":ckpt-step-N")
    project_id: str = Field(index=True)
    job_id: str = Field(index=True)
    base_model: str
    storage_key: str  # folder in the artifact store holding adapter_config.json + adapter_model.safetensors
    created_at: int = Field(default_factory=now)
    checkpoint_step: int | None = None
    deleted: bool = Field(default=False, index=True)


class IdempotencyRow(SQLModel, table=True):
    """An `Idempotency-Key` a client sent with a create request, and the object that request created: a retry
    with the same key gets the same object instead of a duplicate."""

    __tablename__ = "idempotency_key"
    __table_args__ = (Index("ux_idempotency_project_kind_key", "project_id", "kind", "key", unique=True),)
    pk: int | None = Field(default=None, primary_key=True)
    project_id: str
    kind: str  # "file" | "job"
    key: str
    object_id: str
    created_at: int = Field(default_factory=now)


class CheckpointPermissionRow(SQLModel, table=True):
    """Another project allowed to start fine-tuning jobs from a checkpoint (OpenAI's `checkpoint.permission`);
    granted, listed and deleted by the checkpoint's own project only."""

    __tablename__ = "checkpoint_permission"
    __table_args__ = (
        Index("ux_checkpoint_permission_checkpoint_project", "checkpoint", "project_id", unique=True),
    )
    pk: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True)  # "cp_…"
    checkpoint: str  # the checkpoint's model name, `ft:...:ckpt-step-N`
    owner_project_id: str = Field(index=True)  # the checkpoint's project
    project_id: str  # the project granted
    created_at: int = Field(default_factory=now)
