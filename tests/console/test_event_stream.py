"""`GET /v1/fine_tuning/jobs/{id}/events?stream=true` over real HTTP (httpx): a real `tuneworks api` and a real
`tuneworks worker` training the tiny model, the session's redis-server.

The stream sends the existing events, then the new ones while the job trains, then `event: end` once the job
is terminal; it holds exactly the events the paginated list has, oldest first; `Last-Event-ID` resumes after
an event; another project's job is a 404; and the plain list (the SDK's `list_events`) is unchanged.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.base_models import TINY
from tests.conftest import REPO, ApiServer, settings_env
from tests.service.conftest import chat_file, service_settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path) -> Iterator[ApiServer]:
    home = tmp_path_factory.mktemp("stream") / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    settings = service_settings(home, redis_url, worker_metrics_port=0, api_metrics_port=0)
    api = ApiServer(settings, home / "api.log")
    log = (home / "worker.log").open("w")
    worker = subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneworks"), "worker"], env=settings_env(settings),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    yield api
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
    log.close()
    api.stop()


def read_stream(response: httpx.Response) -> list[dict]:
    """The SSE messages of `response` as {"id", "event", "data", "at"} dicts (data parsed as JSON, `at` the
    monotonic time the message arrived)."""
    messages: list[dict] = []
    current: dict = {}
    for line in response.iter_lines():
        if not line:
            if "data" in current:
                current["data"] = json.loads(current["data"])
                current["at"] = time.monotonic()
                messages.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return messages


def stream(api: ApiServer, job_id: str, key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.get(
        f"{api.base_url}/fine_tuning/jobs/{job_id}/events",
        params={"stream": "true"},
        headers={"Authorization": f"Bearer {key or api.key}", **headers},
        timeout=httpx.Timeout(120, connect=10),
    )


def test_the_stream_follows_a_training_job_to_its_end(stack: ApiServer) -> None:
    with stack.client() as client:
        file_id = client.files.create(file=("train.jsonl", chat_file(20)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id,
                                             hyperparameters={"n_epochs": 2, "batch_size": 2})  # fmt: skip
        with httpx.stream("GET", f"{stack.base_url}/fine_tuning/jobs/{job.id}/events?stream=true",
                          headers={"Authorization": f"Bearer {stack.key}"}, timeout=120) as response:  # fmt: skip
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            messages = read_stream(response)
        final = client.fine_tuning.jobs.retrieve(job.id)
        listed = list(client.fine_tuning.jobs.list_events(job.id, limit=100))  # the SDK's plain list
    assert final.status == "succeeded", final.error
    assert messages[-1]["event"] == "end" and messages[-1]["data"] == {"status": "succeeded"}
    events = messages[:-1]
    assert [m["id"] for m in events] == [e.id for e in reversed(listed)]  # all of them, oldest first
    assert all(m["data"]["id"] == m["id"] and m["event"] == m["data"]["type"] for m in events)
    steps = [m["data"]["data"]["step"] for m in events if m["event"] == "metrics"]
    assert steps == list(range(1, 21)), steps  # 20 examples, batch 2, 2 epochs
    assert events[-1]["data"]["message"] == "The job has successfully completed"
    # Live: the stream opened on a job still validating, so the training events arrived over time, not at once.
    assert events[0]["data"]["message"] != events[-1]["data"]["message"]
    assert events[-1]["at"] - events[0]["at"] > 1.0

    # A finished job's stream sends its events at once and ends; `Last-Event-ID` resumes after that event.
    again = read_stream(stream(stack, job.id))
    assert [m["id"] for m in again[:-1]] == [m["id"] for m in events]
    middle = events[len(events) // 2]["id"]
    resumed = read_stream(stream(stack, job.id, **{"Last-Event-ID": middle}))
    assert [m["id"] for m in resumed[:-1]] == [m["id"] for m in events[len(events) // 2 + 1 :]]


def test_another_projects_job_is_a_404_and_a_bad_key_a_401(stack: ApiServer) -> None:
    with stack.client() as client:
        file_id = client.files.create(file=("train.jsonl", chat_file()), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    other = stack.new_key("proj-other")
    response = stream(stack, job.id, key=other)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "fine_tuning_job_id"
    assert stream(stack, "ftjob-missing").status_code == 404
    assert stream(stack, job.id, key="sk-wrong").status_code == 401


def test_without_stream_the_route_is_the_plain_list(stack: ApiServer) -> None:
    with stack.client() as client:
        file_id = client.files.create(file=("train.jsonl", chat_file()), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
        page = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert page.object == "list" and len(page.data) == 1 and page.has_more in (True, False)
    plain = httpx.get(f"{stack.base_url}/fine_tuning/jobs/{job.id}/events", params={"stream": "false"},
                      headers={"Authorization": f"Bearer {stack.key}"})  # fmt: skip
    assert plain.headers["content-type"] == "application/json" and plain.json()["object"] == "list"
