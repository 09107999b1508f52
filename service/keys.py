"""API keys: each belongs to one project; only the sha256 of the secret is stored.

A key looks like `sk-tw-<40 random url-safe characters>`. `authenticate_key` is what every request goes through
(via the guard middleware and `deps.KeyCache`, whose entries live `auth_cache_seconds`, so a revoked key is refused
within that time). The `*_cli` functions back `tuneworks keys create|revoke|list`; a key is named
by its id (`key_...`, shown by `keys list`) so that revoking it needs no secret on a command line.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Table, bindparam
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.db import init_db, make_engine, session_scope
from core.ids import new_id, now
from core.naming import is_project_name
from core.settings import Settings
from core.tables import ApiKey, Project

logger = logging.getLogger(__name__)


def _table(model: object) -> Table:
    return model.__table__  # type: ignore[attr-defined]


KEY_PREFIX = "sk-tw-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(engine: Engine, *, project: str) -> str:
    """A new key for project `project` (the project is created when new).

    Args:
        engine: the database.
        project: project name, `[A-Za-z0-9_-]{1,64}`.

    Returns:
        The secret key; it is shown once and only its hash is kept.

    Raises:
        ValueError: the project name is not allowed.
    """
    if not is_project_name(project):
        raise ValueError(f"invalid project name {project!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    key = KEY_PREFIX + secrets.token_urlsafe(30)
    with session_scope(engine) as session:
        row = _get_or_create_project(session, project)
        session.add(ApiKey(id=new_id("key_"), project_id=row.id, key_hash=hash_key(key), prefix=key[:10]))
    logger.info("project %s: created key %s…", project, key[:10])
    return key


def _get_or_create_project(session: Session, name: str) -> Project:
    row = session.exec(select(Project).where(Project.name == name)).first()
    if row is None:
        row = Project(id=new_id("proj_"), name=name)
        session.add(row)
        session.flush()
    return row


def revoke_key(engine: Engine, *, key: str | None = None, key_id: str | None = None) -> bool:
    """Revoke the key whose secret is `key`, or whose id is `key_id`. Returns False when no active key matches."""
    condition = ApiKey.id == key_id if key_id is not None else ApiKey.key_hash == hash_key(key or "")
    with session_scope(engine) as session:
        row = session.exec(select(ApiKey).where(condition)).first()
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = now()
        session.add(row)
    logger.info("revoked key %s (%s…)", row.id, row.prefix)
    return True


@dataclass
class KeyInfo:
    """What `keys list` shows of a key: never the secret nor its hash."""

    id: str
    project: str
    prefix: str
    created_at: int
    revoked_at: int | None


def list_keys(engine: Engine, *, project: str | None = None) -> list[KeyInfo]:
    """Every key (of `project` only, when given), oldest first."""
    statement = select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)  # type: ignore[arg-type]
    if project is not None:
        statement = statement.where(Project.name == project)
    with Session(engine) as session:
        rows = session.exec(statement.order_by(ApiKey.pk)).all()  # type: ignore[arg-type]
    return [KeyInfo(k.id, name, k.prefix, k.created_at, k.revoked_at) for k, name in rows]


def authenticate_key(engine: Engine, key: str) -> Project | None:
    """The project of an active key, or None for an unknown or revoked key."""
    with Session(engine) as session:
        statement = (
            select(Project)
            .join(ApiKey, ApiKey.project_id == Project.id)  # type: ignore[arg-type]
            .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at == None)  # noqa: E711
        )
        return session.exec(statement).first()


_ACTIVE_KEY_PROJECT = (
    sa_select(*_table(Project).c)
    .join(_table(ApiKey), _table(ApiKey).c.project_id == _table(Project).c.id)
    .where(_table(ApiKey).c.key_hash == bindparam("key_hash"), _table(ApiKey).c.revoked_at.is_(None))
)


def project_of_active_key(*, connection: Connection, key: str) -> Project | None:
    """`authenticate_key` as one prepared Core query on a plain connection (the guard middleware's lookup)."""
    row = connection.execute(_ACTIVE_KEY_PROJECT, {"key_hash": hash_key(key)}).first()
    return None if row is None else Project(**row._mapping)


def create_key_cli(settings: Settings, *, project: str) -> str:
    """`tuneworks keys create --project NAME`: the new key (the CLI prints it as the only stdout line).

    Raises:
        SystemExit: the project name is not allowed (message on stderr).
    """
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    try:
        return create_key(engine, project=project)
    except ValueError as exc:
        raise SystemExit(f"tuneworks keys create: {exc}") from None
    finally:
        engine.dispose()


def revoke_key_cli(settings: Settings, *, key: str | None = None, key_id: str | None = None) -> int:
    """`tuneworks keys revoke --id KEY_ID` (or the secret `KEY`): exit code 0 when revoked, 1 when no active key
    matched."""
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    try:
        if revoke_key(engine, key=key, key_id=key_id):
            return 0
        print("tuneworks keys revoke: no active key matches", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def list_keys_cli(settings: Settings, *, project: str | None = None) -> int:
    """`tuneworks keys list [--project NAME]`: one tab-separated line per key (id, project, prefix, created,
    revoked; times in UTC, `-` when not revoked) under a header line. Exit code 0."""
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    try:
        keys = list_keys(engine, project=project)
    finally:
        engine.dispose()
    print("id\tproject\tprefix\tcreated\trevoked")
    for item in keys:
        revoked = _time(item.revoked_at) if item.revoked_at is not None else "-"
        print(f"{item.id}\t{item.project}\t{item.prefix}\t{_time(item.created_at)}\t{revoked}")
    return 0


def _time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
