"""Models: the base models that can be fine-tuned (owned by `system`) and the project's fine-tuned models and
checkpoints (owned by the project). Deleting a fine-tuned model marks it deleted (its job keeps
`fine_tuned_model`), deletes its checkpoints' models too, and tells the serve processes to unload them.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlmodel import Session, col, select

from core import base_models, queue
from core.ids import now
from core.settings import Settings
from core.tables import ModelRow, Project
from service.errors import ModelNotFound, PermissionDenied
from service.protocol import Model, ModelDeleted, ModelList

logger = logging.getLogger(__name__)


def _base_model(settings: Settings, model_id: str) -> Model:
    entry = base_models.get(settings, model_id)
    created = int(entry.path.stat().st_mtime) if entry is not None and entry.path.exists() else 0
    return Model(id=model_id, created=created, owned_by="system")


def to_openai(row: ModelRow, project: Project) -> Model:
    return Model(id=row.id, created=row.created_at, owned_by=project.name, parent=row.base_model)


def list_models(*, session: Session, settings: Settings, project: Project) -> ModelList:
    """Base models, then the project's fine-tuned models and checkpoints in creation order."""
    data = [_base_model(settings, model_id) for model_id in base_models.known_ids(settings)]
    rows = session.exec(
        select(ModelRow)
        .where(ModelRow.project_id == project.id, col(ModelRow.deleted).is_(False))
        .order_by(col(ModelRow.pk))
    ).all()
    return ModelList(data=data + [to_openai(row, project) for row in rows])


def _row(session: Session, project: Project, model: str) -> ModelRow | None:
    statement = select(ModelRow).where(
        ModelRow.id == model, ModelRow.project_id == project.id, col(ModelRow.deleted).is_(False)
    )
    return session.exec(statement).first()


def live_row(session: Session, project: Project, model: str) -> ModelRow:
    """The project's live fine-tuned model `model`.

    Raises:
        ModelNotFound: unknown, deleted, or another project's model.
    """
    row = _row(session, project, model)
    if row is None:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    return row


def retrieve(*, session: Session, settings: Settings, project: Project, model: str) -> Model:
    """One model by id (base id, `ft:` name or checkpoint name).

    Raises:
        ModelNotFound: unknown, deleted, or another project's model.
    """
    if model in base_models.known_ids(settings):
        return _base_model(settings, model)
    row = _row(session, project, model)
    if row is None:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    return to_openai(row, project)


def delete(
    *, session: Session, settings: Settings, project: Project, model: str
) -> tuple[ModelDeleted, list[str]]:
    """Delete a fine-tuned model (with its checkpoints' models when it is a job's final model).

    Returns:
        The response and the names of every model that was deleted (to unload from the inference servers).

    Raises:
        PermissionDenied: `model` is a base model.
        ModelNotFound: unknown, deleted, or another project's model.
    """
    if model in base_models.known_ids(settings):
        raise PermissionDenied(f"The base model '{model}' cannot be deleted.", param="model")
    row = _row(session, project, model)
    if row is None:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    rows = [row]
    if row.checkpoint_step is None:
        rows += session.exec(
            select(ModelRow).where(
                ModelRow.job_id == row.job_id, col(ModelRow.deleted).is_(False), ModelRow.id != row.id
            )
        ).all()
    for item in rows:
        item.deleted = True
        session.add(item)
    session.commit()
    names = [item.id for item in rows]
    logger.info("model %s: deleted (%d model(s) with its checkpoints) at %d", model, len(names), now())
    return ModelDeleted(id=model, deleted=True), names


async def announce_deleted(redis: Any, names: list[str]) -> None:
    """Tell the serve processes to unload `names` (their periodic sweep catches up when Redis is down), and
    drop their drift series."""
    from service import drift_monitor

    for name in names:
        drift_monitor.forget(name)
        try:
            if redis is None:
                raise ConnectionError("redis is down")
            await queue.publish_adapter_event(redis, "deleted", name)
        except Exception as exc:
            logger.warning("model %s: could not announce the deletion (%s)", name, exc)


async def announce_ready(redis: Any, name: str) -> None:
    """Tell the serve processes that `name` is servable (their periodic sweep catches up when Redis is down)."""
    try:
        if redis is None:
            raise ConnectionError("redis is down")
        await queue.publish_adapter_event(redis, "ready", name)
    except Exception as exc:
        logger.warning("model %s: could not announce it (%s)", name, exc)
