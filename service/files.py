"""Files: streamed multipart upload into the artifact store, validation of training files, listing, deletion.

The upload is parsed with python-multipart's streaming parser straight from the request body: file bytes go to
the artifact store chunk by chunk (never the whole file in memory), the size limit is enforced while reading, and
a refused upload leaves nothing behind. `fine-tune` files are then validated line by line (`validation.py`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core import metrics
from core.ids import new_id, now
from core.job_status import TERMINAL
from core.storage import ArtifactStore
from core.store_keys import file_key
from core.tables import FileRow, JobRow
from core.training_files import read_lines, validate_jsonl
from service import idempotency
from service.deps import Database
from service.errors import APIError, InvalidRequest, PayloadTooLarge, not_found
from service.protocol import USER_PURPOSES, FileDeleted, FileObject

logger = logging.getLogger(__name__)

MIN_EXPIRY, MAX_EXPIRY = 3600, 2592000  # expires_after[seconds] range
BATCH_EXPIRY = 30 * 24 * 3600  # batch files expire after 30 days unless told otherwise
MAX_FIELD_BYTES = 4096  # a non-file form field longer than this is refused
MAX_PARTS = 16  # parts of one upload (the `file` and a few fields): more is a 400
MAX_PART_HEADER_BYTES = 8192  # the headers of one part
# What a body may carry besides the file's bytes (the guard middleware's limit is FT_MAX_UPLOAD_BYTES plus this).
MULTIPART_OVERHEAD_BYTES = MAX_PARTS * (MAX_FIELD_BYTES + MAX_PART_HEADER_BYTES + 1024)
_SECONDS = re.compile(r"[0-9]{1,8}")  # `expires_after[seconds]`: ASCII digits only (`isdigit` takes "²")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # dropped from filenames (PostgreSQL refuses NUL in text)
MAX_LINE_BYTES = 16 * 1024 * 1024  # a training example (one JSONL line) longer than this is an error


def to_openai(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        expires_at=row.expires_at,
        status_details=row.status_details,
    )


# --- upload ------------------------------------------------------------------------------------------------
@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


class UploadReader:
    """Parses a multipart body; the `file` part is written to `sink`, the other fields are kept as text."""

    def __init__(self, boundary: bytes, sink: BinaryIO, *, limit: int) -> None:
        self.sink, self.limit = sink, limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.parts = 0
        self._part = _Part()
        self._header = [b"", b""]
        self._header_bytes = 0
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._extend(0, d[s:e]),
                "on_header_value": lambda d, s, e: self._extend(1, d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"An upload has at most {MAX_PARTS} parts.", param="file")
        self._part = _Part()
        self._header_bytes = 0

    def _extend(self, index: int, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise InvalidRequest(
                f"The headers of a part are longer than {MAX_PART_HEADER_BYTES} bytes.", param="file"
            )
        self._header[index] += data

    def _header_end(self) -> None:
        self._part.headers[self._header[0].lower()] = self._header[1]
        self._header = [b"", b""]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options and self._part.name == "file":
            if self.filename is not None:
                raise InvalidRequest("Only one `file` part is allowed.", param="file")
            self.filename = (
                _CONTROL.sub("", options[b"filename"].decode("utf-8", "replace"))[:512] or "upload"
            )
            self._part.filename = self.filename

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part.filename is not None:
            self.size += end - start
            if self.size > self.limit:
                raise PayloadTooLarge(f"File is larger than the limit of {self.limit} bytes.", param="file")
            self.sink.write(data[start:end])
            return
        self._part.data += data[start:end]
        if len(self._part.data) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"Form field `{self._part.name}` is too long.", param=self._part.name or None
            )

    def _end(self) -> None:
        if self._part.filename is None:
            self.fields[self._part.name] = self._part.data.decode("utf-8", "replace")

    async def read(self, stream: AsyncIterator[bytes]) -> None:
        """Feed the whole body to the parser. On a refusal the rest of the body is read and dropped, so that
        the client, still sending, gets the error response instead of a broken connection."""
        try:
            async for chunk in stream:
                self._parser.write(chunk)
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"Malformed multipart body: {exc}", param="file") from None
        except APIError:
            async for _ in stream:
                pass
            raise


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a `Content-Type` header.

    Raises:
        InvalidRequest: the body is not multipart/form-data.
    """
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest(
            "Uploads must be multipart/form-data with a `file` and a `purpose` field.", param="file"
        )
    return options[b"boundary"]


async def upload(
    *,
    db: Database,
    store: ArtifactStore,
    project_id: str,
    content_type: str,
    stream: AsyncIterator[bytes],
    limit: int,
    idempotency_key: str | None = None,
) -> FileObject:
    """Store an uploaded file and validate it when its purpose is `fine-tune`.

    Args:
        db: the database (each step in its own short session: none is held while the body streams in).
        store: artifact store that receives the bytes under `files/<file id>`.
        project_id: owner of the file.
        content_type: the request's `Content-Type` (multipart boundary).
        stream: the request body.
        limit: largest file accepted, in bytes.
        idempotency_key: the request's `Idempotency-Key`; a repeated key returns the file it created.

    Returns:
        The new file, `processed` or `error` (with `status_details` naming the first bad line).

    Raises:
        InvalidRequest: a missing or bad `file`, `purpose` or `expires_after` field (nothing is kept).
        PayloadTooLarge: the file is over `limit` bytes (nothing is kept).
    """
    key = idempotency.check_key(idempotency_key)
    earlier = await db.run(_earlier_upload, project_id=project_id, key=key)
    if earlier is not None:
        async for _ in stream:  # a retry: its body is not needed
            pass
        return earlier
    file_id = new_id("file-")
    with store.writer(file_key(file_id)) as sink:
        reader = UploadReader(boundary_of(content_type), sink, limit=limit)
        await reader.read(stream)
        purpose, expires_at = _check_fields(reader)
    row = FileRow(
        id=file_id, project_id=project_id, bytes=reader.size, filename=reader.filename or "upload",
        purpose=purpose, storage_key=file_key(file_id), status="processed",
    )  # fmt: skip
    row.expires_at = expires_at(row.created_at)
    # Validation and the database write block, so they run off the event loop.
    return await db.run(_register, store=store, row=row, idempotency_key=key)


def _register(
    *, session: Session, store: ArtifactStore, row: FileRow, idempotency_key: str | None
) -> FileObject:
    """Validate a stored upload and commit its row; the stored bytes go when that fails."""
    try:
        if row.purpose == "fine-tune":
            _validate(row, store)
        session.add(row)
        idempotency.record(
            session, project_id=row.project_id, kind="file", key=idempotency_key, object_id=row.id
        )
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        store.delete(row.storage_key)
        session.rollback()
        winner = idempotency.find(session, project_id=row.project_id, kind="file", key=idempotency_key)
        return _by_id(session, str(winner))
    except BaseException:
        store.delete(row.storage_key)
        raise
    metrics.FILES_UPLOADED.labels(purpose=row.purpose, status=row.status).inc()
    metrics.UPLOAD_BYTES.inc(row.bytes)
    logger.info(
        "file %s: uploaded %d bytes, purpose %s, status %s", row.id, row.bytes, row.purpose, row.status
    )
    return to_openai(row)


def _earlier_upload(*, session: Session, project_id: str, key: str | None) -> FileObject | None:
    """The file an earlier upload with `key` created, while it still exists. Once it is deleted or expired the
    key is free again (its row goes), so the retry uploads anew instead of returning a file nobody can use."""
    file_id = idempotency.find(session, project_id=project_id, kind="file", key=key)
    if file_id is None:
        return None
    row = session.exec(select(FileRow).where(FileRow.id == file_id, *visible(project_id))).first()
    if row is not None:
        return to_openai(row)
    idempotency.forget(session, project_id=project_id, kind="file", key=str(key))
    session.commit()
    return None


def _by_id(session: Session, file_id: str) -> FileObject:
    return to_openai(session.exec(select(FileRow).where(FileRow.id == file_id)).one())


def _check_fields(reader: UploadReader) -> tuple[str, Callable[[int], int | None]]:
    if reader.filename is None:
        raise InvalidRequest("Missing the `file` part of the upload.", param="file")
    purpose = reader.fields.get("purpose")
    if purpose not in USER_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}: expected one of {', '.join(USER_PURPOSES)}.", param="purpose"
        )
    anchor = reader.fields.get("expires_after[anchor]")
    seconds = reader.fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return purpose, lambda created: created + BATCH_EXPIRY if purpose == "batch" else None
    if anchor != "created_at":
        raise InvalidRequest("`expires_after[anchor]` must be `created_at`.", param="expires_after.anchor")
    if seconds is None or not _SECONDS.fullmatch(seconds) or not MIN_EXPIRY <= int(seconds) <= MAX_EXPIRY:
        raise InvalidRequest(
            f"`expires_after[seconds]` must be an integer from {MIN_EXPIRY} to {MAX_EXPIRY}.",
            param="expires_after.seconds",
        )
    return purpose, lambda created: created + int(seconds)


def _validate(row: FileRow, store: ArtifactStore) -> None:
    with store.open(row.storage_key) as handle:
        report = validate_jsonl(
            read_lines(handle, max_line_bytes=MAX_LINE_BYTES), max_line_bytes=MAX_LINE_BYTES
        )
    row.data_format, row.n_examples = report.format, report.n_examples
    if report.counts or report.n_examples == 0:
        row.status = "error"
        row.status_details = report.summary() if report.counts else "The file has no examples."
    else:
        row.status_details = None
    if row.status == "error":
        logger.info("file %s: invalid: %s", row.id, row.status_details)


# --- read, list, delete ------------------------------------------------------------------------------------
def visible(project_id: str) -> tuple[Any, ...]:
    """Conditions of a file the project can use: its own, not deleted, not expired."""
    return (
        FileRow.project_id == project_id,
        col(FileRow.deleted).is_(False),
        or_(col(FileRow.expires_at).is_(None), col(FileRow.expires_at) > now()),
    )


def get_row(*, session: Session, project_id: str, file_id: str, param: str = "id") -> FileRow:
    """The project's file `file_id`.

    Raises:
        NotFound: unknown, deleted, expired or another project's file.
    """
    row = session.exec(select(FileRow).where(FileRow.id == file_id, *visible(project_id))).first()
    if row is None:
        raise not_found("File", file_id, param=param)
    return row


def content(*, session: Session, store: ArtifactStore, project_id: str, file_id: str) -> tuple[FileRow, str]:
    """The file row and the local path of its bytes."""
    row = get_row(session=session, project_id=project_id, file_id=file_id)
    return row, str(store.path(row.storage_key))


def delete(*, session: Session, store: ArtifactStore, project_id: str, file_id: str) -> FileDeleted:
    """Delete a file and its bytes.

    Raises:
        NotFound: no such file for this project.
        InvalidRequest: a job that has not finished uses the file.
    """
    row = get_row(session=session, project_id=project_id, file_id=file_id)
    users = session.exec(
        select(JobRow.id).where(
            or_(col(JobRow.training_file) == file_id, col(JobRow.validation_file) == file_id),
            col(JobRow.status).not_in([s.value for s in TERMINAL]),
        )
    ).first()
    if users is not None:
        raise InvalidRequest(
            f"File {file_id} is used by job {users}, which has not finished.", param="file_id"
        )
    row.deleted = True
    session.add(row)
    session.commit()
    store.delete(row.storage_key)
    logger.info("file %s: deleted", file_id)
    return FileDeleted(id=file_id, deleted=True)
