"""`POST /v1/chat/completions` and `POST /v1/completions`: thin handlers over `service.gateway`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.engine import Engine

from core.settings import Settings
from core.tables import Project
from service import gateway
from service.deps import EngineDep, ProjectDep, SettingsDep, get_redis
from service.errors import InvalidRequest

router = APIRouter(tags=["inference"])


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except RecursionError as exc:  # json gives up on deep nesting with RecursionError, not ValueError
        raise InvalidRequest("The request body is nested too deeply.") from exc
    except ValueError as exc:  # also an integer of thousands of digits, and bytes that are not UTF-8
        raise InvalidRequest("The request body is not valid JSON.") from exc


def _redis(request: Request) -> gateway.RedisGetter:
    # Not a dependency: only an on-demand adapter load needs Redis, so a base-model request never waits for a
    # reconnection attempt while Redis is down.
    return lambda: get_redis(request)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, project: ProjectDep, settings: SettingsDep, engine: EngineDep
) -> JSONResponse | StreamingResponse:
    return await _complete(request, project, settings, engine, "chat")


@router.post("/completions", response_model=None)
async def completions(
    request: Request, project: ProjectDep, settings: SettingsDep, engine: EngineDep
) -> JSONResponse | StreamingResponse:
    return await _complete(request, project, settings, engine, "completions")


async def _complete(
    request: Request,
    project: Project,
    settings: Settings,
    engine: Engine,
    endpoint: Literal["chat", "completions"],
) -> JSONResponse | StreamingResponse:
    body = await _json_body(request)
    return await gateway.complete(state=request.app.state, settings=settings, engine=engine, project=project,
                                  endpoint=endpoint, body=body, redis=_redis(request))  # fmt: skip
