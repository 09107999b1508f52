"""The API process itself: /health, /ready, /metrics (on its own port), the 500 envelope, life without Redis."""

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


def metrics_text(server: ApiServer) -> str:
    return httpx.get(f"http://127.0.0.1:{server.settings.api_metrics_port}/metrics", timeout=10).text


def test_health_ready_and_metrics(server: ApiServer) -> None:
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    ready = httpx.get(f"{root}/ready")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ok",
        "checks": {"database": True, "redis": True},
    }
    with server.client() as client:
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        client.files.retrieve(file_id)
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    text = metrics_text(server)
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


def test_metrics_are_not_served_on_the_api_port(server: ApiServer) -> None:
    """They name every project's models (drift series): only the metrics port, bound to FT_METRICS_HOST, has them."""
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/metrics").status_code == 404
    assert "ft_http_requests_total" in metrics_text(server)
    assert server.settings.metrics_host == "127.0.0.1"


def test_request_metric_labels_are_bounded(server: ApiServer) -> None:
    """A made-up method is `other`, an unknown path `unmatched`; a request the guard refuses (401) still counts
    under its route template."""
    root = server.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {server.key}"}
    for method in ("PROPFIND", "PURGE", "MKCOL", "REPORT"):  # methods the HTTP parser lets through
        response = httpx.request(method, f"{server.base_url}/files", headers=headers)
        assert response.status_code in (400, 405), response.text
    httpx.get(f"{root}/no/such/path/{secrets_token()}")
    httpx.get(f"{server.base_url}/files/file-{secrets_token()}")  # no key: 401 before routing
    text = metrics_text(server)
    methods = set(re.findall(r'^ft_http_requests_total\{method="([^"]+)"', text, re.M))
    assert methods <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}, methods
    assert metric(text, "ft_http_requests_total", method="other", route="/v1/files", status="405") >= 4
    assert metric(text, "ft_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    assert (
        metric(text, "ft_http_requests_total", method="GET", route="/v1/files/{file_id}", status="401") >= 1
    )
    assert "/no/such/path" not in text and "file-" not in text


def secrets_token() -> str:
    import secrets

    return secrets.token_hex(8)


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
        degraded = httpx.get(f"{root}/ready")  # files, jobs and completions work without Redis: still ready
        assert degraded.status_code == 200 and degraded.json() == {
            "status": "degraded",
            "checks": {"database": True, "redis": False},
        }
        with server.client() as client:
            file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
            offline = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
            assert offline.status == "validating_files"
            assert "ft_jobs" in metrics_text(server)  # the queue depth is unknown, the rest is served
            redis_proc = start_redis(port, tmp_path)
            online = wait_until_enqueued(client, settings, file_id)
        engine_url = settings.resolved_database_url
        from core.db import make_engine

        engine = make_engine(engine_url)
        with Session(engine) as session:
            tokens = {j.id: j.queue_token for j in session.exec(select(JobRow)).all()}
        engine.dispose()
        queued = redis.Redis.from_url(settings.resolved_redis_url)
        try:  # every job is committed with its queue token; only the online one was pushed under it
            assert (
                queued.zscore(settings.queue_name, str(tokens[offline.id])) is None
            )  # left to the reconciler
            assert queued.zscore(settings.queue_name, str(tokens[online])) is not None
        finally:
            queued.close()
        assert httpx.get(f"{root}/ready").json()["status"] == "ok"
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
