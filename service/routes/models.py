"""`/v1/models`: list, retrieve, delete. Model ids contain `:` and may contain `/` (raw or as `%2F`)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service import models
from service.deps import ProjectDep, RedisDep, SessionDep, SettingsDep
from service.errors import GUARDED, documented
from service.protocol import Model, ModelDeleted, ModelList

router = APIRouter(tags=["models"], responses=documented(*GUARDED))


@router.get("/models")
def list_models(project: ProjectDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    return models.list_models(session=session, settings=settings, project=project)


@router.get("/models/{model:path}", responses=documented(404))
def retrieve_model(model: str, project: ProjectDep, session: SessionDep, settings: SettingsDep) -> Model:
    return models.retrieve(session=session, settings=settings, project=project, model=model)


@router.delete("/models/{model:path}", responses=documented(403, 404))
async def delete_model(model: str, project: ProjectDep, session: SessionDep, settings: SettingsDep,
                       redis: RedisDep) -> ModelDeleted:  # fmt: skip
    deleted, names = await run_in_threadpool(
        models.delete, session=session, settings=settings, project=project, model=model
    )
    await models.announce_deleted(redis, names)
    return deleted
