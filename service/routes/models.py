"""`/v1/models`: list, retrieve, delete. Model ids contain `:` and may contain `/` (raw or as `%2F`)."""

from __future__ import annotations

from fastapi import APIRouter

from service import models
from service.deps import DatabaseDep, ProjectDep, RedisDep, SettingsDep
from service.errors import GUARDED, documented
from service.protocol import Model, ModelDeleted, ModelList

router = APIRouter(tags=["models"], responses=documented(*GUARDED))


@router.get("/models")
async def list_models(project: ProjectDep, db: DatabaseDep, settings: SettingsDep) -> ModelList:
    return await db.run(models.list_models, settings=settings, project=project)


@router.get("/models/{model:path}", responses=documented(404))
async def retrieve_model(model: str, project: ProjectDep, db: DatabaseDep, settings: SettingsDep) -> Model:
    return await db.run(models.retrieve, settings=settings, project=project, model=model)


@router.delete("/models/{model:path}", responses=documented(403, 404))
async def delete_model(model: str, project: ProjectDep, db: DatabaseDep, settings: SettingsDep,
                       redis: RedisDep) -> ModelDeleted:  # fmt: skip
    deleted, names = await db.run(models.delete, settings=settings, project=project, model=model)
    await models.announce_deleted(redis, names)
    return deleted
