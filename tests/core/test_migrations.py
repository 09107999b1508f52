"""Schema migrations: the revisions build exactly the tables of `core/tables.py`, and upgrading keeps data."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from core.db import make_engine
from core.migrations import upgrade


def test_revisions_match_the_tables(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == [], f"tables.py changed without a migration (python -m core.migrations revision): {diff}"


def test_upgrade_is_repeatable_and_keeps_rows(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO project (id, name, created_at) VALUES ('proj_1', 'keep', 1)"))
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM project")).scalar_one() == "keep"
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()


def test_database_from_before_migrations_is_stamped(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    SQLModel.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO project (id, name, created_at) VALUES ('proj_1', 'old', 1)"))
    upgrade(engine)
    assert "alembic_version" in inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM project")).scalar_one() == "old"
