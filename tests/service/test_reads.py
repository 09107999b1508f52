"""`Database.read`: SQLite reads on the event loop, on a read-only connection, and on a worker thread when that
connection is busy."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from core.db import init_db, make_engine, make_loop_reader
from service.deps import Database


def _count(*, connection: Connection) -> tuple[int, str]:
    return int(
        connection.execute(text("select count(*) from project")).scalar_one()
    ), threading.current_thread().name


@pytest.fixture
def database(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url, connections=2)
    init_db(engine)
    with engine.begin() as connection:
        connection.execute(text("insert into project (id, name, created_at) values ('proj_1', 'p', 0)"))
    return Database(engine, loop_reader=make_loop_reader(url))


def test_a_read_runs_on_the_event_loop_thread(database: Database) -> None:
    async def read() -> tuple[int, str]:
        return await database.read(_count)

    assert asyncio.run(read()) == (1, threading.current_thread().name)


def test_the_loop_connection_cannot_write(database: Database) -> None:
    assert database.loop_reader is not None
    with database.loop_reader.connect() as connection, pytest.raises(OperationalError, match="readonly"):
        connection.execute(text("insert into project (id, name, created_at) values ('proj_2', 'q', 0)"))


def test_a_busy_database_sends_the_read_to_a_worker_thread(database: Database, tmp_path: Path) -> None:
    """A connection in exclusive locking mode keeps every reader out, even in WAL mode: the loop's read gives up
    after its 50 ms busy timeout and a worker thread (with the long timeout) waits until the lock is gone."""
    database.engine.dispose()  # no pooled connection of the fixture's left open
    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("insert into project (id, name, created_at) values ('proj_2', 'q', 0)")
    holder.execute("COMMIT")  # the exclusive lock stays until the connection closes

    def release() -> None:
        time.sleep(0.5)
        holder.close()

    async def read() -> tuple[int, str]:
        return await database.read(_count)

    releaser = threading.Thread(target=release)
    releaser.start()
    started = time.monotonic()
    count, thread = asyncio.run(read())
    releaser.join()
    assert count == 2
    assert thread != threading.current_thread().name  # answered by a worker thread
    assert time.monotonic() - started >= 0.4  # it waited for the lock instead of failing
