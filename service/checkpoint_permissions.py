"""Checkpoint sharing, as OpenAI's `/v1/fine_tuning/checkpoints/{checkpoint}/permissions`: the project that owns
a checkpoint (`ft:...:ckpt-step-N`) grants other projects the right to start fine-tuning jobs from it, lists and
deletes those grants. A granted project can do that and nothing else (`granted()`, called by job creation): the
checkpoint stays invisible to it everywhere else (models list and retrieve, export, delete, completions). For any
project but the owner, the permission endpoints answer 404, as for any object of another project.

`project_ids` are project ids (`proj_…`); a project's name is accepted too (what `tuneworks keys create
--project NAME` made), and the answer carries the id.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.ids import new_id
from core.tables import CheckpointPermissionRow, ModelRow, Project
from service import pagination
from service.errors import InvalidRequest, ModelNotFound, not_found
from service.protocol import CheckpointPermission, CheckpointPermissionDeleted, CheckpointPermissionList

logger = logging.getLogger(__name__)

MAX_PROJECTS = 100  # project ids in one create request
Order = Literal["ascending", "descending"]


def to_openai(row: CheckpointPermissionRow) -> CheckpointPermission:
    return CheckpointPermission(id=row.id, created_at=row.created_at, project_id=row.project_id)


def granted(session: Session, *, checkpoint: str, project_id: str) -> bool:
    """True when project `project_id` may start a fine-tuning job from `checkpoint` (a model name
    `ft:...:ckpt-step-N`) of another project: a permission exists and the checkpoint is still live."""
    live = select(ModelRow.pk).where(
        ModelRow.id == checkpoint,
        col(ModelRow.checkpoint_step).is_not(None),
        col(ModelRow.deleted).is_(False),
        ModelRow.project_id == CheckpointPermissionRow.owner_project_id,
    )
    statement = select(CheckpointPermissionRow.pk).where(
        CheckpointPermissionRow.checkpoint == checkpoint,
        CheckpointPermissionRow.project_id == project_id,
        live.exists(),
    )
    return session.exec(statement).first() is not None


def _own_checkpoint(session: Session, project: Project, checkpoint: str) -> ModelRow:
    """The caller's live checkpoint model `checkpoint`.

    Raises:
        ModelNotFound: unknown, deleted, not a checkpoint, or another project's.
    """
    row = session.exec(
        select(ModelRow).where(
            ModelRow.id == checkpoint,
            ModelRow.project_id == project.id,
            col(ModelRow.checkpoint_step).is_not(None),
            col(ModelRow.deleted).is_(False),
        )
    ).first()
    if row is None:
        raise ModelNotFound(
            f"The checkpoint '{checkpoint}' does not exist or you do not have access to it.",
            param="fine_tuned_model_checkpoint",
        )
    return row


def _grantees(session: Session, owner: Project, project_ids: list[str]) -> list[Project]:
    """The projects named in `project_ids` (ids or names), in order, without repeats.

    Raises:
        InvalidRequest: an empty or too long list, an unknown project, or the owner itself (`param` names it).
    """
    if not project_ids:
        raise InvalidRequest("`project_ids` must name at least one project.", param="project_ids")
    if len(project_ids) > MAX_PROJECTS:
        raise InvalidRequest(f"`project_ids` names at most {MAX_PROJECTS} projects.", param="project_ids")
    found: dict[str, Project] = {}
    for index, value in enumerate(project_ids):
        project = (
            session.exec(select(Project).where(Project.id == value)).first()
            or session.exec(select(Project).where(Project.name == value)).first()
        )
        if project is None:
            raise InvalidRequest(f"No such project: {value!r}.", param=f"project_ids[{index}]")
        if project.id == owner.id:
            raise InvalidRequest(
                "A checkpoint's own project cannot be granted it (it owns it).", param=f"project_ids[{index}]"
            )
        found.setdefault(project.id, project)
    return list(found.values())


def create(
    *, session: Session, project: Project, checkpoint: str, project_ids: list[str]
) -> CheckpointPermissionList:
    """Grant `project_ids` the use of `checkpoint`; a project granted already keeps its permission.

    Returns:
        One permission per project, in the request's order.

    Raises:
        ModelNotFound: not a live checkpoint of the caller's project.
        InvalidRequest: a bad `project_ids` (see `_grantees`).
    """
    row = _own_checkpoint(session, project, checkpoint)
    grantees = _grantees(session, project, project_ids)
    permissions = []
    for grantee in grantees:
        existing = _permission(session, checkpoint=row.id, project_id=grantee.id)
        if existing is None:
            existing = CheckpointPermissionRow(
                id=new_id("cp_"), checkpoint=row.id, owner_project_id=project.id, project_id=grantee.id
            )
            session.add(existing)
        permissions.append(existing)
    try:
        session.commit()
    except IntegrityError:  # a concurrent identical grant won: answer with what is stored
        session.rollback()
        permissions = [_permission(session, checkpoint=row.id, project_id=g.id) for g in grantees]  # type: ignore[misc]
    logger.info("checkpoint %s: granted to %s", row.id, ", ".join(g.id for g in grantees))
    data = [to_openai(p) for p in permissions if p is not None]
    return CheckpointPermissionList(data=data, first_id=data[0].id, last_id=data[-1].id)


def _permission(session: Session, *, checkpoint: str, project_id: str) -> CheckpointPermissionRow | None:
    return session.exec(
        select(CheckpointPermissionRow).where(
            CheckpointPermissionRow.checkpoint == checkpoint, CheckpointPermissionRow.project_id == project_id
        )
    ).first()


def list_permissions(
    *,
    session: Session,
    project: Project,
    checkpoint: str,
    after: str | None,
    limit: int,
    order: Order,
    project_id: str | None,
) -> CheckpointPermissionList:
    """One page of the checkpoint's permissions, newest first unless `order` is `ascending`.

    Raises:
        ModelNotFound: not a live checkpoint of the caller's project.
        InvalidRequest: `after` is not a permission of this checkpoint.
    """
    row = _own_checkpoint(session, project, checkpoint)
    scope = [
        CheckpointPermissionRow.checkpoint == row.id,
        CheckpointPermissionRow.owner_project_id == project.id,
    ]
    if project_id is not None:
        scope.append(CheckpointPermissionRow.project_id == project_id)
    after_pk = None
    if after is not None:
        after_pk = pagination.cursor(session, CheckpointPermissionRow, *scope, after=after,
                                     kind="permission", within=f" of {row.id}")  # fmt: skip
    rows, more = pagination.page(session, select(CheckpointPermissionRow).where(*scope), CheckpointPermissionRow,
                                 after_pk=after_pk, limit=limit, descending=order == "descending")  # fmt: skip
    data = [to_openai(r) for r in rows]
    return CheckpointPermissionList(data=data, has_more=more, first_id=data[0].id if data else None,
                                    last_id=data[-1].id if data else None)  # fmt: skip


def delete(
    *, session: Session, project: Project, checkpoint: str, permission_id: str
) -> CheckpointPermissionDeleted:
    """Withdraw one permission of the caller's checkpoint.

    Raises:
        ModelNotFound: not a live checkpoint of the caller's project.
        NotFound: no such permission of this checkpoint.
    """
    row = _own_checkpoint(session, project, checkpoint)
    permission = session.exec(
        select(CheckpointPermissionRow).where(
            CheckpointPermissionRow.id == permission_id,
            CheckpointPermissionRow.checkpoint == row.id,
            CheckpointPermissionRow.owner_project_id == project.id,
        )
    ).first()
    if permission is None:
        raise not_found("checkpoint.permission", permission_id, param="permission_id")
    session.delete(permission)
    session.commit()
    logger.info("checkpoint %s: permission %s of %s deleted", row.id, permission.id, permission.project_id)
    return CheckpointPermissionDeleted(id=permission_id, deleted=True)
