"""Cursor pagination, as OpenAI lists do it: `after=<id>` and `limit`, answered with a page and `has_more`.

Every table has an integer `pk` that grows with insertion order, so a cursor is the `pk` of the `after` object
and a page is one indexed range scan, exact where `created_at` (whole seconds) ties.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Connection, Select, Table
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Row as CoreRow
from sqlmodel import Session, col, select

from service.errors import InvalidRequest

Row = TypeVar("Row")


def cursor(session: Session, table: Any, *conditions: Any, after: str, kind: str, within: str = "") -> int:
    """The `pk` of the row of `table` whose id is `after` and that meets `conditions` (the caller's scope).

    Raises:
        InvalidRequest: no such row (`param: after`).
    """
    pk = session.exec(select(table.pk).where(table.id == after, *conditions)).first()
    if pk is None:
        raise InvalidRequest(f"Invalid cursor `after`: no {kind} {after}{within}.", param="after")
    return int(pk)


def page(
    session: Session, statement: Any, table: Any, *, after_pk: int | None, limit: int, descending: bool = True
) -> tuple[list[Any], bool]:
    """One page of `statement` ordered by `table.pk`, past `after_pk`, and whether more rows follow."""
    pk = col(table.pk)
    if after_pk is not None:
        statement = statement.where(pk < after_pk if descending else pk > after_pk)
    ordering = pk.desc() if descending else pk.asc()
    rows = list(session.exec(statement.order_by(ordering).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


# --- the same on a Core connection (the hot read paths of `service.job_reads`) -------------------------------
def cursor_pk(
    connection: Connection, table: Table, *conditions: Any, after: str, kind: str, within: str = ""
) -> int:
    """`cursor()` for a Core `table` on a plain connection.

    Raises:
        InvalidRequest: no such row (`param: after`).
    """
    pk = connection.execute(sa_select(table.c.pk).where(table.c.id == after, *conditions)).scalar()
    if pk is None:
        raise InvalidRequest(f"Invalid cursor `after`: no {kind} {after}{within}.", param="after")
    return int(pk)


def page_rows(
    connection: Connection, statement: Select, table: Table, *, after_pk: int | None, limit: int,
    descending: bool = True,
) -> tuple[list[CoreRow], bool]:  # fmt: skip
    """`page()` for a Core `statement` over `table` on a plain connection."""
    pk = table.c.pk
    if after_pk is not None:
        statement = statement.where(pk < after_pk if descending else pk > after_pk)
    rows = list(
        connection.execute(statement.order_by(pk.desc() if descending else pk.asc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def ends(data: list[Any]) -> dict[str, Any]:
    """`first_id` and `last_id` of a page whose list type has them (files, checkpoints)."""
    return {"first_id": data[0].id if data else None, "last_id": data[-1].id if data else None}
