"""The API on a real PostgreSQL server started here (initdb + pg_ctl as user `postgres`): schema creation, JSON
metadata filters, cursors, state changes and model deletion behave as on SQLite."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlmodel import Session, select

from core.db import make_engine
from core.job_status import JobStatus, transition
from core.tables import JobRow, ModelRow
from tests.conftest import ApiServer, free_port, wait_for_port
from tests.service.conftest import chat_file, service_settings

TINY = "tuneworks/tiny-random-llama"


def _binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return (initdb, pg_ctl) if initdb and pg_ctl else None


def _skip_reason() -> str | None:
    if _binaries() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) are not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    initdb, pg_ctl = _binaries()  # type: ignore[misc]
    # Not under pytest's temp root: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="tuneworks-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, sockets):
            shutil.chown(path, "postgres")
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(
        _as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]), **run
    )  # type: ignore[call-overload]
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "pg.log"), "-w", "start"]),
        **run,
    )  # type: ignore[call-overload]
    try:
        wait_for_port(port)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), **run)  # type: ignore[call-overload]
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_api_flow_on_postgresql(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "home", redis_url, database_url=postgres_url)
    server = ApiServer(settings, tmp_path / "api.log")
    engine = make_engine(postgres_url)
    try:
        with server.client() as client:
            file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
            assert [f.id for f in client.files.list(limit=1)] == [file_id]
            jobs = [
                client.fine_tuning.jobs.create(model=TINY, training_file=file_id, metadata=m).id
                for m in ({"team": "a"}, None, {"team": "b"})
            ]
            assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == jobs[::-1]
            assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [jobs[0]]
            assert [j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata": "null"})] == [jobs[1]]

            transition(
                engine, jobs[0], JobStatus.queued, message="Files validated, moving job to queued state"
            )
            transition(engine, jobs[0], JobStatus.running, message="Fine-tuning job started")
            assert client.fine_tuning.jobs.pause(jobs[0]).status == "paused"
            assert client.fine_tuning.jobs.resume(jobs[0]).status == "queued"
            assert client.fine_tuning.jobs.cancel(jobs[0]).status == "cancelled"
            with pytest.raises(openai.BadRequestError):
                client.fine_tuning.jobs.cancel(jobs[0])
            events = list(client.fine_tuning.jobs.list_events(jobs[0], limit=2))
            assert [e.message for e in events][:2] == ["Fine-tuning job cancelled", "Fine-tuning job resumed"]
            assert len(events) == 7

            with Session(engine) as session:
                project_id = session.exec(select(JobRow.project_id).where(JobRow.id == jobs[0])).one()
                name = f"ft:{TINY}:proj-test::{jobs[0][6:]}"
                session.add(ModelRow(id=name, project_id=project_id, job_id=jobs[0], base_model=TINY,
                                     storage_key=f"jobs/{jobs[0]}/adapter"))  # fmt: skip
                session.commit()
            assert client.models.retrieve(name).owned_by == "proj-test"
            assert client.models.delete(name).deleted
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve(name)
            with pytest.raises(openai.BadRequestError) as caught:  # jobs[1] and jobs[2] still use it
                client.files.delete(file_id)
            assert "has not finished" in caught.value.message
    finally:
        server.stop()
        engine.dispose()


@pytest.mark.timeout(120)
def test_nul_characters_never_reach_postgresql(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    """PostgreSQL text refuses NUL (a DataError, once a 500): the API answers 400 naming the parameter first."""
    settings = service_settings(tmp_path / "home", redis_url, database_url=postgres_url)
    server = ApiServer(settings, tmp_path / "api.log")
    headers = {"Authorization": f"Bearer {server.key}"}
    try:
        cases = [
            ("GET", "/files/file-%00", None, "file_id"),
            ("GET", "/fine_tuning/jobs/ftjob-%00/checkpoints", None, "fine_tuning_job_id"),
            ("GET", "/fine_tuning/jobs?after=ftjob-%00", None, "after"),
            ("GET", "/fine_tuning/jobs?metadata%5Bteam%5D=%00", None, "metadata"),
            ("DELETE", "/models/ft:x%00", None, "model"),
            ("POST", "/fine_tuning/jobs", {"model": TINY, "training_file": "file-\x00"}, "training_file"),
        ]
        for method, path, body, param in cases:
            response = httpx.request(method, server.base_url + path, headers=headers, json=body)
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["param"] == param
        body = (
            b'--b0\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a\x00.jsonl"\r\n\r\n{}\n\r\n--b0--\r\n'
        )  # a raw NUL in the filename (httpx would percent-encode it)
        multipart = {**headers, "Content-Type": "multipart/form-data; boundary=b0"}
        upload = httpx.post(server.base_url + "/files", headers=multipart, content=body)
        assert upload.status_code == 200 and upload.json()["filename"] == "a.jsonl"
    finally:
        server.stop()
