"""Models (contract §4, checklist item 13): base models, fine-tuned models and checkpoints of the project,
`%2F` and raw `/` in model paths, deletion with its checkpoints, the unload announcement on Redis."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import redis
from sqlmodel import Session, select

from core import queue
from core.naming import checkpoint_model_name, fine_tuned_model_name
from core.tables import JobRow, ModelRow
from tests.conftest import ApiServer

TINY = "tuneworks/tiny-random-llama"


def add_models(db, client, training_file: str, *, suffix: str) -> tuple[str, str, list[str]]:  # type: ignore[no-untyped-def]
    """A job of the client's project with a final model and two checkpoint models, as the worker registers them."""
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix=suffix)
    with Session(db) as session:
        row = session.exec(select(JobRow).where(JobRow.id == job.id)).one()
        project = row.project_id
        name = fine_tuned_model_name(base_model=TINY, project="proj-test", suffix=suffix, job_id=job.id)
        checkpoints = [checkpoint_model_name(name, step) for step in (5, 10)]
        for model_id, step in [(checkpoints[0], 5), (checkpoints[1], 10), (name, None)]:
            session.add(ModelRow(id=model_id, project_id=project, job_id=job.id, base_model=TINY,
                                 storage_key=f"jobs/{job.id}/adapter", checkpoint_step=step))  # fmt: skip
        row.fine_tuned_model = name
        session.add(row)
        session.commit()
    return job.id, name, checkpoints


def test_list_has_base_models_then_the_projects_models(db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    _, name, checkpoints = add_models(db, client, training_file, suffix="listed")
    models = {m.id: m for m in client.models.list()}
    assert models[TINY].owned_by == "system" and models[TINY].object == "model"
    assert models[name].owned_by == "proj-test" and isinstance(models[name].created, int)
    assert all(models[c].owned_by == "proj-test" for c in checkpoints)


def test_retrieve_accepts_percent_encoded_and_raw_slashes(
    server: ApiServer, db, client, training_file: str
) -> None:  # type: ignore[no-untyped-def]
    _, name, checkpoints = add_models(db, client, training_file, suffix="paths")
    assert "/" in name
    assert client.models.retrieve(name).id == name  # the SDK sends %2F
    assert client.models.retrieve(TINY).owned_by == "system"
    headers = {"Authorization": f"Bearer {server.key}"}
    for model_id in (name, checkpoints[0], TINY):
        response = httpx.get(
            f"{server.base_url}/models/{model_id}", headers=headers
        )  # raw "/" as curl sends it
        assert response.status_code == 200 and response.json()["id"] == model_id
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("ft:unknown:model")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"  # type: ignore[attr-defined]


def test_delete_final_model_deletes_its_checkpoints_and_announces(
    server: ApiServer, db, client, training_file: str
) -> None:  # type: ignore[no-untyped-def]
    job_id, name, checkpoints = add_models(db, client, training_file, suffix="deleted")
    heard = listen(server.settings.resolved_redis_url, count=3)
    time.sleep(0.3)  # let the subscriber attach
    deleted = client.models.delete(name)
    assert (deleted.id, deleted.deleted, deleted.object) == (name, True, "model")
    ids = {m.id for m in client.models.list()}
    assert name not in ids and not ids & set(checkpoints)
    for model_id in (name, *checkpoints):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model_id)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    assert client.fine_tuning.jobs.retrieve(job_id).fine_tuned_model == name  # the job record keeps it
    heard.join(10)
    assert sorted((m["event"], m["model"]) for m in heard.messages) == sorted(
        ("deleted", m) for m in (name, *checkpoints)
    )


def test_delete_one_checkpoint_keeps_the_rest(db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    _, name, checkpoints = add_models(db, client, training_file, suffix="ckpt")
    assert client.models.delete(checkpoints[0]).deleted
    ids = {m.id for m in client.models.list()}
    assert checkpoints[0] not in ids and {name, checkpoints[1]} <= ids


def test_deleting_a_base_model_is_403(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.models.delete(TINY)
    assert caught.value.status_code == 403 and caught.value.param == "model"  # type: ignore[attr-defined]
    assert TINY in {m.id for m in client.models.list()}


class Listener(threading.Thread):
    def __init__(self, url: str, count: int) -> None:
        super().__init__(daemon=True)
        self.pubsub = redis.Redis.from_url(url).pubsub()
        self.pubsub.subscribe(queue.ADAPTER_CHANNEL)
        self.count, self.messages = count, []  # type: ignore[var-annotated]

    def run(self) -> None:
        deadline = time.monotonic() + 10
        while len(self.messages) < self.count and time.monotonic() < deadline:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message:
                self.messages.append(json.loads(message["data"]))
        self.pubsub.close()


def listen(url: str, *, count: int) -> Listener:
    listener = Listener(url, count)
    listener.start()
    return listener
