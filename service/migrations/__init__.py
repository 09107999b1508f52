"""Schema migrations. For now the schema is created from the table definitions (version 1); later versions
add alembic revisions here so that an upgrade keeps existing data."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import SQLModel


def upgrade(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)
