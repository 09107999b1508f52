"""`/v1/files`: upload, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from service import file_reads, files
from service.deps import DatabaseDep, IdempotencyKeyDep, ProjectDep, SettingsDep, StoreDep
from service.errors import GUARDED, documented
from service.protocol import USER_PURPOSES, FileDeleted, FileList, FileObject
from service.responses import wire

router = APIRouter(tags=["files"], responses=documented(*GUARDED))


_UPLOAD_BODY = {  # documents the multipart body that `files.upload` parses itself, as a stream
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "purpose": {"type": "string", "enum": list(USER_PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    "file": {"type": "string", "format": "binary"},
                },
            }
        }
    },
}


@router.post("/files", openapi_extra={"requestBody": _UPLOAD_BODY})
async def create_file(request: Request, project: ProjectDep, db: DatabaseDep, store: StoreDep,
                      settings: SettingsDep, idempotency_key: IdempotencyKeyDep = None) -> FileObject:  # fmt: skip
    return await files.upload(
        db=db, store=store, project_id=project.id, content_type=request.headers.get("content-type", ""),
        stream=request.stream(), limit=settings.max_upload_bytes, idempotency_key=idempotency_key,
    )  # fmt: skip


@router.get("/files", response_model=FileList)
async def list_files(
    project: ProjectDep,
    db: DatabaseDep,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Response:
    page = await db.read(file_reads.list_files, inline=limit <= file_reads.INLINE_PAGE, project_id=project.id,
                         purpose=purpose, limit=limit, order=order, after=after)  # fmt: skip
    return wire(page)


@router.get("/files/{file_id}", response_model=FileObject, responses=documented(404))
async def retrieve_file(file_id: str, project: ProjectDep, db: DatabaseDep) -> Response:
    return wire(await db.read(file_reads.retrieve, project_id=project.id, file_id=file_id))


@router.get("/files/{file_id}/content", responses=documented(404))
async def file_content(file_id: str, project: ProjectDep, db: DatabaseDep, store: StoreDep) -> FileResponse:
    row, path = await db.run(files.content, store=store, project_id=project.id, file_id=file_id)
    media_type = "text/csv" if row.purpose == "fine-tune-results" else "application/octet-stream"
    return FileResponse(
        path, media_type=media_type, filename=row.filename, content_disposition_type="attachment"
    )


@router.delete("/files/{file_id}", responses=documented(404))
async def delete_file(file_id: str, project: ProjectDep, db: DatabaseDep, store: StoreDep) -> FileDeleted:
    return await db.run(files.delete, store=store, project_id=project.id, file_id=file_id)
