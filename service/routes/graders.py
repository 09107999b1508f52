"""`POST /v1/fine_tuning/alpha/graders/run` and `/validate`: thin handlers over `service.graders`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service import graders
from service.deps import EngineDep, ProjectDep, SettingsDep, get_redis
from service.errors import GUARDED, documented
from service.gateway import RedisGetter

router = APIRouter(tags=["graders"], responses=documented(*GUARDED))


def _redis(request: Request) -> RedisGetter:
    return lambda: get_redis(request)  # only a judge adapter's on-demand load needs Redis


@router.post("/fine_tuning/alpha/graders/run")
async def run_grader(body: graders.GraderRunRequest, request: Request, project: ProjectDep, settings: SettingsDep,
                     engine: EngineDep) -> graders.GraderRunResponse:  # fmt: skip
    return await graders.run(settings=settings, state=request.app.state, engine=engine, project=project,
                             redis=_redis(request), body=body)  # fmt: skip


@router.post("/fine_tuning/alpha/graders/validate")
async def validate_grader(body: graders.GraderValidateRequest, request: Request, project: ProjectDep,
                          settings: SettingsDep, engine: EngineDep) -> graders.GraderValidateResponse:  # fmt: skip
    return await graders.validate(settings=settings, state=request.app.state, engine=engine, project=project,
                                  redis=_redis(request), grader=body.grader)  # fmt: skip
