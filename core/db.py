"""Database engine and sessions. SQLite (WAL, safe across processes) by default, PostgreSQL by URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=connections,
            max_overflow=0,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    keep = max(2, connections // 4)
    return create_engine(url, pool_pre_ping=True, pool_size=keep, max_overflow=connections - keep)


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
