"""`/v1/fine_tuning/checkpoints/{checkpoint}/permissions`: grant, list, delete (OpenAI's checkpoint sharing).
Checkpoint names contain `:` and may contain `/` (raw or as `%2F`)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from service import checkpoint_permissions as permissions
from service.checkpoint_permissions import Order
from service.deps import DatabaseDep, ProjectDep
from service.errors import GUARDED, documented
from service.protocol import (
    CheckpointPermissionCreateRequest,
    CheckpointPermissionDeleted,
    CheckpointPermissionList,
)

router = APIRouter(tags=["fine-tuning"], responses=documented(*GUARDED, 404))
PATH = "/fine_tuning/checkpoints/{checkpoint:path}/permissions"


@router.post(PATH)
async def create_permissions(checkpoint: str, body: CheckpointPermissionCreateRequest, project: ProjectDep,
                             db: DatabaseDep) -> CheckpointPermissionList:  # fmt: skip
    return await db.run(
        permissions.create, project=project, checkpoint=checkpoint, project_ids=body.project_ids
    )


@router.get(PATH)
async def list_permissions(
    checkpoint: str,
    project: ProjectDep,
    db: DatabaseDep,
    after: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    order: Order = "descending",
    project_id: str | None = None,
) -> CheckpointPermissionList:
    return await db.run(permissions.list_permissions, project=project, checkpoint=checkpoint, after=after,
                        limit=limit, order=order, project_id=project_id)  # fmt: skip


@router.delete(PATH + "/{permission_id}")
async def delete_permission(checkpoint: str, permission_id: str, project: ProjectDep,
                            db: DatabaseDep) -> CheckpointPermissionDeleted:  # fmt: skip
    return await db.run(
        permissions.delete, project=project, checkpoint=checkpoint, permission_id=permission_id
    )
