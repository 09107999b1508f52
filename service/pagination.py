"""Cursor pagination, as OpenAI lists do it: `after=<id>` and `limit`, answered with a page and `has_more`.

Every table has an integer `pk` that grows with insertion order, so a cursor is the `pk` of the `after` object
and a page is one indexed range scan, exact where `created_at` (whole seconds) ties.
"""

from __future__ import annotations

from typing import Any, TypeVar

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
