"""`/v1/models`: list, retrieve, delete; extensions: export (`/models/{model}/export`) and import
(`POST /models/import`). Model ids contain `:` and may contain `/` (raw or as `%2F`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service import exports, model_import, models
from service.deps import DatabaseDep, ProjectDep, RedisDep, SettingsDep, StoreDep
from service.errors import GUARDED, documented
from service.protocol import Model, ModelDeleted, ModelList

router = APIRouter(tags=["models"], responses=documented(*GUARDED))


@router.get("/models")
async def list_models(project: ProjectDep, db: DatabaseDep, settings: SettingsDep) -> ModelList:
    return await db.run(models.list_models, settings=settings, project=project)


_IMPORT_BODY = {  # documents the multipart body that `model_import` parses itself, as a stream
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "tar, tar.gz or zip"},
                    "model": {"type": "string", "description": "base model id"},
                    "suffix": {"type": "string"},
                },
            }
        }
    },
}


@router.post("/models/import", openapi_extra={"requestBody": _IMPORT_BODY})
async def import_model(request: Request, project: ProjectDep, db: DatabaseDep, settings: SettingsDep,
                       store: StoreDep, redis: RedisDep) -> Model:  # fmt: skip
    return await model_import.import_adapter(
        db=db, settings=settings, store=store, project=project, redis=redis,
        content_type=request.headers.get("content-type", ""), stream=request.stream(),
    )  # fmt: skip


# Before `/models/{model:path}`, which would take `.../export` as part of a model id.
@router.get("/models/{model:path}/export", response_class=StreamingResponse,
            responses={**documented(404), 200: {"content": {"application/x-tar": {}}}})  # fmt: skip
async def export_model(model: str, project: ProjectDep, db: DatabaseDep, settings: SettingsDep, store: StoreDep,
                       format: str = "adapter") -> StreamingResponse:  # fmt: skip
    export = await db.run(
        exports.prepare, settings=settings, store=store, project=project, model=model, format=format
    )
    headers = {"content-disposition": f'attachment; filename="{export.filename}"',
               "content-length": str(export.size)}  # fmt: skip
    return StreamingResponse(export.stream(), media_type="application/x-tar", headers=headers)


@router.get("/models/{model:path}", responses=documented(404))
async def retrieve_model(model: str, project: ProjectDep, db: DatabaseDep, settings: SettingsDep) -> Model:
    return await db.run(models.retrieve, settings=settings, project=project, model=model)


@router.delete("/models/{model:path}", responses=documented(403, 404))
async def delete_model(model: str, project: ProjectDep, db: DatabaseDep, settings: SettingsDep,
                       redis: RedisDep) -> ModelDeleted:  # fmt: skip
    deleted, names = await db.run(models.delete, settings=settings, project=project, model=model)
    await models.announce_deleted(redis, names)
    return deleted
