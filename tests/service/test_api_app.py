"""The API process itself: /health, /ready, /metrics, the 500 envelope, and life without Redis."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import redis
from sqlmodel import Session, select

from core.tables import JobRow
from tests.conftest import ApiServer, free_port, start_redis
from tests.service.conftest import chat_file, service_settings

TINY = "tuneworks/tiny-random-llama"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", text, re.M) if labels else None
    if not labels:
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name}{{{wanted}}} not in /metrics"
    return float(match.group(1))


def test_health_ready_and_metrics(server: ApiServer) -> None:
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    ready = httpx.get(f"{root}/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "redis": True}
    with server.client() as client:
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        client.files.retrieve(file_id)
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    text = httpx.get(f"{root}/metrics").text
    assert (
        metric(text, "ft_http_requests_total", method="GET", route="/v1/files/{file_id}", status="200") >= 1
    )
    assert file_id not in text  # route templates, never raw paths
    assert metric(text, "ft_jobs", status="validating_files") == 2
    assert metric(text, "ft_jobs", status="running") == 0
    connection = redis.Redis.from_url(server.settings.resolved_redis_url)
    try:
        assert metric(text, "ft_queue_depth") == connection.zcard(server.settings.queue_name) == 2
    finally:
        connection.close()
    assert metric(text, "ft_files_uploaded_total", purpose="fine-tune", status="processed") >= 1


def test_unexpected_failure_is_a_logged_500_envelope(server: ApiServer) -> None:
    with server.client() as client:
        created = client.files.create(file=chat_file(), purpose="fine-tune")
        (server.settings.artifacts_dir / "files" / created.id).unlink()  # the stored bytes vanish
        with pytest.raises(openai.InternalServerError) as caught:
            client.files.content(created.id)
    assert caught.value.status_code == 500 and caught.value.request_id
    assert caught.value.body == {
        "message": "Internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }


@pytest.mark.timeout(60)
def test_without_redis_jobs_are_committed_and_enqueued_once_it_is_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    settings = service_settings(tmp_path / "home", f"redis://127.0.0.1:{port}/0")
    server = ApiServer(settings, tmp_path / "api.log")
    redis_proc = None
    try:
        root = server.base_url.removesuffix("/v1")
        down = httpx.get(f"{root}/ready")
        assert down.status_code == 503 and down.json()["checks"] == {"database": True, "redis": False}
        with server.client() as client:
            file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
            offline = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
            assert offline.status == "validating_files"
            assert httpx.get(f"{root}/metrics").status_code == 200
            redis_proc = start_redis(port, tmp_path)
            online = wait_until_enqueued(client, settings, file_id)
        engine_url = settings.resolved_database_url
        from core.db import make_engine

        engine = make_engine(engine_url)
        with Session(engine) as session:
            tokens = {j.id: j.queue_token for j in session.exec(select(JobRow)).all()}
        engine.dispose()
        assert tokens[offline.id] is None  # left to the worker's reconciler
        assert tokens[online] is not None
        assert httpx.get(f"{root}/ready").status_code == 200
    finally:
        server.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def wait_until_enqueued(client, settings, file_id: str) -> str:  # type: ignore[no-untyped-def]
    """Create jobs until the API has reconnected to Redis and one lands in the queue (within ~10 s)."""
    import time

    connection = redis.Redis.from_url(settings.resolved_redis_url)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
            if connection.zcard(settings.queue_name):
                return job.id
            time.sleep(1)
    finally:
        connection.close()
    raise AssertionError("the API never reconnected to Redis")
