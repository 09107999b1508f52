"""Database engine and sessions. SQLite (WAL, safe across processes) by default, PostgreSQL by URL."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from core import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

logger = logging.getLogger(__name__)


def make_engine(url: str, *, connections: int = 16) -> Engine:
    """An engine for `url` whose pool holds up to `connections` connections (the API sizes it to its threads).

    SQLite gets WAL (readers never wait for the writer) and a long busy timeout so API, worker and serve can share
    one file; PostgreSQL keeps a quarter of the pool open and checks a connection before use.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            json_deserializer=json_loads,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=connections,
            max_overflow=0,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    keep = max(2, connections // 4)
    return create_engine(url, json_deserializer=json_loads, pool_pre_ping=True, pool_size=keep,
                         max_overflow=connections - keep)  # fmt: skip


def json_loads(text: str | bytes) -> Any:
    """JSON columns decoded by orjson (several times faster than `json.loads` on the API's list pages); a value
    orjson refuses (`NaN`, which `json.dumps` writes for a diverged loss) falls back to `json.loads`."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_db(engine: Engine) -> None:
    """Create or upgrade the schema to the newest version."""
    from core.migrations import upgrade

    upgrade(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def make_loop_reader(url: str) -> Engine | None:
    """For SQLite, an engine of one read-only connection for reads run on the API's event loop; else None.

    A read of one indexed row from SQLite costs tens of microseconds, less than handing it to a worker thread
    and back. In WAL mode a reader never waits for a writer, so such a read does not block the loop; the rare
    SQLITE_BUSY (WAL recovery, a checkpoint restart) waits at most `busy_timeout` (50 ms) before the caller gives
    the read to a worker thread. `query_only` makes sure nothing on this connection ever writes. The one
    connection (StaticPool) is used only from the event loop's thread, one read at a time. PostgreSQL reads cross
    a network: they stay on worker threads.
    """
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.pool import StaticPool

    engine = create_engine(url, json_deserializer=json_loads, connect_args={"check_same_thread": False, "timeout": 0.05},
                           poolclass=StaticPool)  # fmt: skip
    event.listen(engine, "connect", _loop_reader_pragmas)
    return engine


def _loop_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=50")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()
