"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from core import queue
from service import event_stream, job_reads, jobs
from service.deps import DatabaseDep, EngineDep, IdempotencyKeyDep, ProjectDep, RedisDep, SettingsDep
from service.errors import GUARDED, InvalidRequest, documented
from service.protocol import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    JobCreateRequest,
)
from service.responses import wire

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=documented(*GUARDED))


@router.post("")
async def create_job(body: JobCreateRequest, project: ProjectDep, engine: EngineDep, settings: SettingsDep,
                     redis: RedisDep, idempotency_key: IdempotencyKeyDep = None) -> FineTuningJob:  # fmt: skip
    row, new = await run_in_threadpool(
        jobs.create,
        engine=engine,
        settings=settings,
        project=project,
        request=body,
        idempotency_key=idempotency_key,
    )
    if new:
        await jobs.enqueue(engine=engine, redis=redis, settings=settings, function=queue.VALIDATE_JOB,
                           job_id=row.id, token=row.queue_token)  # fmt: skip
    return jobs.to_openai(row)


@router.get("", response_model=FineTuningJobList)
async def list_jobs(request: Request, project: ProjectDep, db: DatabaseDep, after: str | None = None,
                    limit: int = Query(20, ge=1, le=100)) -> Response:  # fmt: skip
    metadata, metadata_null = _metadata_filter(request)
    return wire(await db.read(
        job_reads.list_jobs,
        project_id=project.id,
        after=after,
        limit=limit,
        metadata=metadata,
        metadata_null=metadata_null,
    ))  # fmt: skip


def _metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    """`?metadata[k]=v` pairs (the SDK's bracket form) and `?metadata=null`."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            pairs[name[len("metadata[") : -1]] = value
        elif name == "metadata" and value != "null":
            raise InvalidRequest("Use `metadata[key]=value` pairs or `metadata=null`.", param="metadata")
    return pairs, request.query_params.get("metadata") == "null"


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, responses=documented(404))
async def retrieve_job(fine_tuning_job_id: str, project: ProjectDep, db: DatabaseDep) -> Response:
    return wire(await db.read(job_reads.retrieve, project_id=project.id, job_id=fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel", responses=documented(404))
async def cancel_job(fine_tuning_job_id: str, project: ProjectDep, engine: EngineDep) -> FineTuningJob:
    row = await run_in_threadpool(
        jobs.cancel, engine=engine, project_id=project.id, job_id=fine_tuning_job_id
    )
    return jobs.to_openai(row)


@router.post("/{fine_tuning_job_id}/pause", responses=documented(404))
async def pause_job(fine_tuning_job_id: str, project: ProjectDep, engine: EngineDep) -> FineTuningJob:
    row = await run_in_threadpool(jobs.pause, engine=engine, project_id=project.id, job_id=fine_tuning_job_id)
    return jobs.to_openai(row)


@router.post("/{fine_tuning_job_id}/resume", responses=documented(404))
async def resume_job(fine_tuning_job_id: str, project: ProjectDep, engine: EngineDep, settings: SettingsDep,
                     redis: RedisDep) -> FineTuningJob:  # fmt: skip
    row = await run_in_threadpool(
        jobs.resume, engine=engine, project_id=project.id, job_id=fine_tuning_job_id
    )
    await jobs.enqueue(engine=engine, redis=redis, settings=settings, function=queue.TRAIN_JOB, job_id=row.id)
    return jobs.to_openai(row)


@router.get("/{fine_tuning_job_id}/events", response_model=FineTuningJobEventList, responses=documented(404))
async def list_events(request: Request, fine_tuning_job_id: str, project: ProjectDep, db: DatabaseDep,
                      after: str | None = None,
                      limit: int = Query(20, ge=1, le=100)) -> Response:  # fmt: skip
    if event_stream.wants_stream(request):  # `?stream=true`: server-sent events (service/event_stream.py)
        return await event_stream.stream_events(
            request=request, database=db, project_id=project.id, job_id=fine_tuning_job_id
        )
    return wire(await db.read(
        job_reads.list_events, project_id=project.id, job_id=fine_tuning_job_id, after=after, limit=limit
    ))  # fmt: skip


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=FineTuningJobCheckpointList,
            responses=documented(404))  # fmt: skip
async def list_checkpoints(fine_tuning_job_id: str, project: ProjectDep, db: DatabaseDep,
                           after: str | None = None, limit: int = Query(10, ge=1, le=100)) -> Response:  # fmt: skip
    return wire(await db.read(
        job_reads.list_checkpoints, project_id=project.id, job_id=fine_tuning_job_id, after=after, limit=limit
    ))  # fmt: skip
