"""`Idempotency-Key` on create requests (`POST /v1/files`, `POST /v1/fine_tuning/jobs`).

The openai SDK retries a POST after a timeout or a 5xx without sending a key, so duplicates stay possible for it;
clients that send the header (curl users, other SDKs) get exactly one object per key and project: a retry returns
the object the first request created, whatever the retry's body says. A key whose file was deleted (or expired)
is free again: the retry creates a new file (jobs cannot be deleted, so a job key stays bound to its job).
"""

from __future__ import annotations

from sqlmodel import Session, delete, select

from core.tables import IdempotencyRow
from service.errors import InvalidRequest

MAX_KEY_LENGTH = 255
HEADER = "Idempotency-Key"


def check_key(key: str | None) -> str | None:
    """The key, or None when absent.

    Raises:
        InvalidRequest: an empty, too long or non-printable key.
    """
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(f"`{HEADER}` must be 1 to {MAX_KEY_LENGTH} printable characters.", param=HEADER)
    return key


def find(session: Session, *, project_id: str, kind: str, key: str | None) -> str | None:
    """The id of the object created earlier with `key`, or None."""
    if key is None:
        return None
    statement = select(IdempotencyRow.object_id).where(
        IdempotencyRow.project_id == project_id, IdempotencyRow.kind == kind, IdempotencyRow.key == key
    )
    return session.exec(statement).first()


def record(session: Session, *, project_id: str, kind: str, key: str | None, object_id: str) -> None:
    """Remember that `key` created `object_id` (committed with the object; a concurrent twin fails on the unique
    index and its caller returns the winner's object)."""
    if key is not None:
        session.add(IdempotencyRow(project_id=project_id, kind=kind, key=key, object_id=object_id))


def forget(session: Session, *, project_id: str, kind: str, key: str) -> None:
    """Free `key` (its object is gone); the caller commits."""
    session.exec(  # type: ignore[call-overload]
        delete(IdempotencyRow).where(
            IdempotencyRow.project_id == project_id,  # type: ignore[arg-type]
            IdempotencyRow.kind == kind,  # type: ignore[arg-type]
            IdempotencyRow.key == key,  # type: ignore[arg-type]
        )
    )
