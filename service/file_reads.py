"""The read paths of `/v1/files`: retrieve and list, as SQLAlchemy Core queries on a plain connection (run by
`Database.read`; why not the ORM: `service.job_reads`). Uploads, content and deletion stay in `service.files`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, bindparam, or_, select

from core.ids import now
from core.tables import FileRow
from service import pagination
from service.errors import not_found
from service.files import to_openai
from service.protocol import FileList, FileObject

FILES: Table = FileRow.__table__  # type: ignore[attr-defined]
INLINE_PAGE = 100  # a longer page (`limit` goes up to 10000) is read on a worker thread, off the event loop


def _visible(project_id: Any, at: Any) -> tuple[Any, ...]:
    """`files.visible()` in Core: the project's own file, not deleted, not expired at `at`."""
    return (
        FILES.c.project_id == project_id,
        FILES.c.deleted.is_(False),
        or_(FILES.c.expires_at.is_(None), FILES.c.expires_at > at),
    )


_FILE = select(FILES).where(
    FILES.c.id == bindparam("file_id"), *_visible(bindparam("project_id"), bindparam("at"))
)


def retrieve(*, connection: Connection, project_id: str, file_id: str) -> FileObject:
    """The project's file `file_id`.

    Raises:
        NotFound: unknown, deleted, expired or another project's file.
    """
    row = connection.execute(_FILE, {"file_id": file_id, "project_id": project_id, "at": now()}).first()
    if row is None:
        raise not_found("File", file_id, param="id")
    return to_openai(row)  # type: ignore[arg-type]  # a Core row with FileRow's attribute names


def list_files(
    *, connection: Connection, project_id: str, purpose: str | None, limit: int, order: str, after: str | None
) -> FileList:
    """One page of the project's files, ordered by creation (`desc` newest first), after the file `after`."""
    visible = _visible(project_id, now())
    statement = select(FILES).where(*visible)
    if purpose is not None:
        statement = statement.where(FILES.c.purpose == purpose)
    after_pk = (
        None if after is None else pagination.cursor_pk(connection, FILES, *visible, after=after, kind="file")
    )
    rows, has_more = pagination.page_rows(connection, statement, FILES, after_pk=after_pk, limit=limit,
                                          descending=order == "desc")  # fmt: skip
    data = [to_openai(row) for row in rows]  # type: ignore[arg-type]
    return FileList(data=data, **pagination.ends(data), has_more=has_more)
