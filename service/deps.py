"""FastAPI dependencies, each an `Annotated` alias: settings, database, artifact store, Redis, the caller's project.

The resources are created once by the app's lifespan (`app.py`) and kept on `app.state`. Every dependency is
`async def`: FastAPI runs a plain `def` dependency on a worker thread, and a thread hop per dependency per request
cost more than the request's own database query.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from arq.connections import ArqRedis
from fastapi import Depends, Header, Request
from sqlalchemy import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from core import queue
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import Project
from service.errors import Unauthorized
from service.keys import authenticate_key, project_of_active_key

logger = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_RETRY_SECONDS = 5.0  # while Redis is down, try to connect again at most this often


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


class Database:
    """The API's way to the database: each call runs in a worker thread, in a session opened and closed there.

    No session (and so no pooled connection) is ever held across an `await`. A request that kept one while it
    waited for a thread, for response serialisation or for the rest of an upload could, at 64 concurrent
    clients, leave every connection with requests waiting for threads and every thread with requests waiting
    for connections: the 30 s pool timeouts measured before this class existed.
    """

    def __init__(self, engine: Engine, *, loop_reader: Engine | None = None) -> None:
        self.engine = engine
        self.loop_reader = loop_reader  # SQLite: one read-only connection for reads on the event loop

    async def run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """`fn(session=<a new session>, **kwargs)` in a worker thread; the session is closed before returning."""
        return await run_in_threadpool(self.call, fn, **kwargs)

    async def read(self, fn: Callable[..., T], /, *, inline: bool = True, **kwargs: Any) -> T:
        """`fn(connection=<a Core connection>, **kwargs)` for a short read-only query (no ORM session).

        On SQLite it runs right here on the event loop, on `loop_reader`'s connection: a WAL read does not wait
        for writers and costs less than the hop to a worker thread (measured: the hop and the ORM session were
        most of a job retrieve's time). When that connection is busy (SQLITE_BUSY after 50 ms, or it is in use:
        never, as reads do not await) the read goes to a worker thread instead, as it always does on PostgreSQL
        and when the caller says the read is not short (`inline=False`).
        """
        if self.loop_reader is not None and inline:
            try:
                with self.loop_reader.connect() as connection:
                    return fn(connection=connection, **kwargs)
            except OperationalError as exc:
                if not _busy(exc):
                    raise
                logger.debug("loop read busy (%s): on a worker thread instead", exc)
        return await run_in_threadpool(self._read, fn, **kwargs)

    def _read(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        with self.engine.connect() as connection:
            return fn(connection=connection, **kwargs)

    def call(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """The same, in the calling thread (for code that already runs in a worker thread)."""
        with Session(self.engine, expire_on_commit=False) as session:
            return fn(session=session, **kwargs)


def _busy(exc: OperationalError) -> bool:
    message = str(exc.orig).lower()
    return "locked" in message or "busy" in message


async def get_database(request: Request) -> Database:
    return request.app.state.database


async def connect_redis(settings: Settings) -> ArqRedis | None:
    """An arq pool, or None when Redis does not answer (one quick try, no retries)."""
    redis_settings = replace(
        queue.redis_settings(settings.resolved_redis_url), conn_retries=0, conn_timeout=2
    )
    try:
        return await queue.connect(settings.resolved_redis_url, settings=redis_settings)
    except Exception as exc:  # redis-py raises its own ConnectionError, not a subclass of OSError
        logger.warning(
            "redis %s: not reachable (%s); will retry", _without_password(settings.resolved_redis_url), exc
        )
        return None


def _without_password(url: str) -> str:
    """`redis://:secret@host:6379/0` -> `redis://:***@host:6379/0`, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def get_redis(request: Request) -> ArqRedis | None:
    """The app's Redis pool, connecting lazily when it was down at start (None while it is still down)."""
    state = request.app.state
    if state.redis is None and time.monotonic() - state.redis_tried_at > REDIS_RETRY_SECONDS:
        state.redis_tried_at = time.monotonic()
        state.redis = await connect_redis(state.settings)
    return state.redis


async def authenticate(request: Request) -> Project:
    """The project of the request's `Authorization: Bearer` key.

    The guard middleware authenticates every `/v1/` request before its body is read and leaves the project on
    the request's state; this dependency takes it from there (and checks the header itself otherwise).

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    project = getattr(request.state, "project", None)
    if isinstance(project, Project):
        return project
    return await run_in_threadpool(
        project_of_key, request.app.state.engine, request.headers.get("authorization", "")
    )


def project_of_key(engine: Engine, authorization: str) -> Project:
    """The project of an `Authorization` header's bearer key (a database lookup: no cache, so a revoked key is
    refused at once).

    `OpenAI-Organization` and `OpenAI-Project` headers are accepted and ignored: the key decides the project.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    project = authenticate_key(engine, _bearer_key(authorization))
    if project is None:
        raise Unauthorized("Incorrect API key provided.")
    return project


def project_of_header(*, connection: Connection, authorization: str) -> Project:
    """`project_of_key` on a plain connection, as one prepared query (`keys.project_of_active_key`).

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    project = project_of_active_key(connection=connection, key=_bearer_key(authorization))
    if project is None:
        raise Unauthorized("Incorrect API key provided.")
    return project


def _bearer_key(authorization: str) -> str:
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header: `Authorization: Bearer KEY`."
        )
    return key.strip()


class KeyCache:
    """Projects of recently seen API keys, for `ttl` seconds: most requests then skip the database lookup (and its
    thread hop) that otherwise costs as much as the request's own query. A key revoked with `tuneworks keys revoke`
    (another process) stops working within `ttl` seconds. Only keys that authenticated are kept (at most
    `size`, least recently used dropped first), and they are kept by their hash, never in clear.
    """

    def __init__(self, *, ttl: float, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[str, tuple[Project, float]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Project]] = {}

    async def resolve(self, authorization: str, database: Database) -> Project:
        """The project of an `Authorization` header: from the cache, else from one database lookup that every
        request asking for the same key meanwhile shares (when an entry expires under load, 64 concurrent
        requests made 64 lookups at once; now they make one).

        Raises:
            Unauthorized: no key, a malformed header, or an unknown or revoked key.
        """
        project = self.get(authorization)
        if project is not None:
            return project
        if self.ttl <= 0:  # no cache: every request looks its key up itself
            return await database.read(project_of_header, authorization=authorization)
        digest = _digest(authorization)
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(database.read(project_of_header, authorization=authorization))
            self._pending[digest] = pending
            pending.add_done_callback(lambda _: self._pending.pop(digest, None))
        project = await asyncio.shield(pending)
        self.put(authorization, project)
        return project

    def get(self, authorization: str) -> Project | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(_digest(authorization))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, authorization: str, project: Project) -> None:
        if self.ttl <= 0:
            return
        digest = _digest(authorization)
        self._entries[digest] = (project, time.monotonic() + self.ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RedisDep = Annotated[ArqRedis | None, Depends(get_redis)]
DatabaseDep = Annotated[Database, Depends(get_database)]
ProjectDep = Annotated[Project, Depends(authenticate)]
IdempotencyKeyDep = Annotated[
    str | None, Header(alias="Idempotency-Key")
]  # optional header of create requests
