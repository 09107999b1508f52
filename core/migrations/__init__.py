"""Schema migrations (alembic revisions in `versions/`), applied by every process at start.

`upgrade(engine)` brings any database to the newest revision and keeps its data. It holds a lock while it runs
(a file lock beside a SQLite database, an advisory lock on PostgreSQL) so that the API, the worker and the
serve process starting together do not migrate at once. A database created before migrations existed (tables
but no `alembic_version`) is stamped as the first revision, then upgraded.

A schema change: edit `core/tables.py`, then
`.venv/bin/python -m core.migrations revision "what changed"` writes a new revision by comparing the tables
with a database at the newest revision; review it and commit it.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

from core.locks import file_lock

HERE = Path(__file__).resolve().parent
FIRST_REVISION = "0001"
_PG_LOCK_ID = 0x7475_6E65  # "tune"


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Migrate the database of `engine` to the newest revision."""
    with _lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        existing = set(inspect(connection).get_table_names())
        config = _config(connection)
        if existing and "alembic_version" not in existing:
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")


@contextmanager
def _lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with file_lock(Path(database).with_name(Path(database).name + ".migrate-lock")):
        yield


def revision(message: str) -> None:
    """Write a new revision: the difference between `core/tables.py` and the newest revision."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/schema.db")
        with engine.begin() as connection:
            config = _config(connection)
            command.upgrade(config, "head")
            command.revision(config, message=message, autogenerate=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "revision":
        raise SystemExit('usage: python -m core.migrations revision "message"')
    revision(sys.argv[2])
