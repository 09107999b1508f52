"""FastAPI dependencies, each an `Annotated` alias: settings, database, artifact store, Redis, the caller's project.

The resources are created once by the app's lifespan (`app.py`) and kept on `app.state`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Header, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core import queue
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import Project
from service.errors import Unauthorized
from service.keys import authenticate_key

logger = logging.getLogger(__name__)

REDIS_RETRY_SECONDS = 5.0  # while Redis is down, try to connect again at most this often


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


async def connect_redis(settings: Settings) -> ArqRedis | None:
    """An arq pool, or None when Redis does not answer (one quick try, no retries)."""
    redis_settings = replace(
        queue.redis_settings(settings.resolved_redis_url), conn_retries=0, conn_timeout=2
    )
    try:
        return await queue.connect(settings.resolved_redis_url, settings=redis_settings)
    except Exception as exc:  # redis-py raises its own ConnectionError, not a subclass of OSError
        logger.warning("redis %s: not reachable (%s); will retry", settings.resolved_redis_url, exc)
        return None


async def get_redis(request: Request) -> ArqRedis | None:
    """The app's Redis pool, connecting lazily when it was down at start (None while it is still down)."""
    state = request.app.state
    if state.redis is None and time.monotonic() - state.redis_tried_at > REDIS_RETRY_SECONDS:
        state.redis_tried_at = time.monotonic()
        state.redis = await connect_redis(state.settings)
    return state.redis


def authenticate(request: Request) -> Project:
    """The project of the request's `Authorization: Bearer` key.

    The guard middleware authenticates every `/v1/` request before its body is read and leaves the project on
    the request's state; this dependency takes it from there (and checks the header itself otherwise).

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    project = getattr(request.state, "project", None)
    if isinstance(project, Project):
        return project
    return project_of_key(request.app.state.engine, request.headers.get("authorization", ""))


def project_of_key(engine: Engine, authorization: str) -> Project:
    """The project of an `Authorization` header's bearer key (a database lookup: no cache, so a revoked key is
    refused at once).

    `OpenAI-Organization` and `OpenAI-Project` headers are accepted and ignored: the key decides the project.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header: `Authorization: Bearer KEY`."
        )
    project = authenticate_key(engine, key.strip())
    if project is None:
        raise Unauthorized("Incorrect API key provided.")
    return project


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RedisDep = Annotated[ArqRedis | None, Depends(get_redis)]
SessionDep = Annotated[Session, Depends(get_session)]
ProjectDep = Annotated[Project, Depends(authenticate)]
IdempotencyKeyDep = Annotated[
    str | None, Header(alias="Idempotency-Key")
]  # optional header of create requests
