"""Fine-tuning jobs through the real openai SDK (contract §3, checklist items 4, 5, 8 and the state changes of 10).

No worker runs here: jobs stay in `validating_files` unless a test moves them with `job_status.transition`, as the
worker would.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from sqlmodel import Session

from core.job_status import JobStatus, add_event, transition
from core.tables import CheckpointRow, JobRow, ModelRow
from tests.conftest import ApiServer
from tests.service.conftest import chat_file

TINY = "tuneworks/tiny-random-llama"
REQUIRED = {
    "created_at", "error", "finished_at", "fine_tuned_model", "hyperparameters", "id", "model", "object",
    "organization_id", "result_files", "status", "trained_tokens", "training_file", "validation_file", "seed",
}  # fmt: skip


def raw_job(server: ApiServer, job_id: str) -> dict:
    response = httpx.get(
        f"{server.base_url}/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {server.key}"}
    )
    response.raise_for_status()
    return response.json()


def test_minimal_create_has_every_required_key(server: ApiServer, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    body = raw_job(server, job.id)
    assert body.keys() >= REQUIRED
    assert body["object"] == "fine_tuning.job" and body["id"].startswith("ftjob-")
    assert body["status"] == "validating_files" and body["model"] == TINY
    assert (body["fine_tuned_model"], body["finished_at"], body["trained_tokens"], body["error"]) == (
        None,
        None,
        None,
        None,
    )
    assert isinstance(body["seed"], int) and 0 <= body["seed"] < 2**31
    assert body["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    assert body["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": body["hyperparameters"]},
    }
    assert body["result_files"] == [] and body["validation_file"] is None
    assert body["user_provided_suffix"] is None and body["lora"] == {} and body["evaluation"] is None
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert events == [f"Validating training file: {training_file}", "Created fine-tuning job"]


def test_full_body_and_lora_extension(client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    validation = client.files.create(file=("valid.jsonl", chat_file(4)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=training_file,
        validation_file=validation,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
        seed=7,
        suffix="my-suffix",
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
        extra_body={"lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "qlora": False}},
    )  # fmt: skip
    assert (job.seed, job.user_provided_suffix, job.metadata) == (7, "my-suffix", {"team": "a"})  # type: ignore[attr-defined]
    assert job.validation_file == validation
    assert job.hyperparameters.model_dump() == {
        "n_epochs": 3,
        "batch_size": "auto",
        "learning_rate_multiplier": 0.5,
    }
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 3
    assert job.lora == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "qlora": False,
    }  # type: ignore[attr-defined]
    assert job.integrations[0].wandb.project == "p"
    assert any(e.level == "warn" for e in client.fine_tuning.jobs.list_events(job.id))


def test_deprecated_hyperparameters_are_mirrored_into_method(client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=training_file, hyperparameters={"n_epochs": 2}
    )
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.method.supervised.hyperparameters.n_epochs == 2
    same = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    both = client.fine_tuning.jobs.create(
        model=TINY, training_file=training_file, hyperparameters={"n_epochs": 2}, method=same
    )
    assert both.hyperparameters.n_epochs == 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=TINY, training_file=training_file, hyperparameters={"n_epochs": 3}, method=same
        )
    assert caught.value.param == "hyperparameters"  # type: ignore[attr-defined]


def sup(**hp: object) -> dict:
    return {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}


def dpo(**hp: object) -> dict:
    return {"method": {"type": "dpo", "dpo": {"hyperparameters": hp}}}


HP = "method.supervised.hyperparameters"
INVALID = [
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"training_file": "<batch>"}, "training_file"),
    ({"validation_file": "file-doesnotexist"}, "validation_file"),
    ({"model": "gpt-4o-mini"}, "model"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"suffix": "a:b"}, "suffix"),
    ({"suffix": ""}, "suffix"),
    ({"suffix": "abc\n"}, "suffix"),  # `$` in a pattern would let the newline through
    (sup(n_epochs=0), f"{HP}.n_epochs"),
    (sup(n_epochs=51), f"{HP}.n_epochs"),
    (sup(n_epochs=2.5), f"{HP}.n_epochs"),
    (sup(n_epochs="many"), f"{HP}.n_epochs"),
    (sup(batch_size=257), f"{HP}.batch_size"),
    (sup(learning_rate_multiplier=0), f"{HP}.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    (dpo(beta=0), "method.dpo.hyperparameters.beta"),
    (dpo(beta=2.5), "method.dpo.hyperparameters.beta"),
    (dpo(beta=0.1), "training_file"),  # a valid DPO request, but a DPO job needs a preference file
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "magic"}}, "method.type"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**31}, "seed"),
    ({"integrations": [{"type": "slack", "wandb": {"project": "p"}}]}, "integrations[0].type"),
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"lora": {"rank": 128}}, "lora.rank"),  # above FT_VLLM_MAX_LORA_RANK (64): could not be served
    ({"lora": {"dropout": 1}}, "lora.dropout"),
    ({"lora": {"target_modules": ["q_proj", "../x"]}}, "lora.target_modules"),
    ({"lora": {"ranks": 8}}, "lora.ranks"),
    ({"lora": {"qlora": "maybe"}}, "lora.qlora"),
    ({"unknown_key": 1}, "unknown_key"),
    ({"training_file": None}, "training_file"),
    ({"model": None}, "model"),
]


@pytest.mark.parametrize(("extra", "param"), INVALID, ids=[p + f"-{i}" for i, (_, p) in enumerate(INVALID)])
def test_create_validation_is_400_with_dotted_param(
    server: ApiServer, client, training_file: str, extra: dict, param: str
) -> None:  # type: ignore[no-untyped-def]
    body = {
        key: value
        for key, value in {"model": TINY, "training_file": training_file, **extra}.items()
        if value is not None
    }
    if body.get("training_file") == "<batch>":
        body["training_file"] = client.files.create(file=b"{}\n", purpose="batch").id
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    response = httpx.post(
        f"{server.base_url}/fine_tuning/jobs", json=body, headers={"Authorization": f"Bearer {server.key}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-request-id"].startswith("req_")
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before


def test_missing_fields_and_empty_body(server: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {server.key}"}
    missing = httpx.post(f"{server.base_url}/fine_tuning/jobs", json={"model": TINY}, headers=headers).json()[
        "error"
    ]
    assert missing == {"message": "Missing required parameter: 'training_file'.", "type": "invalid_request_error",
                       "param": "training_file", "code": "invalid_request"}  # fmt: skip
    empty = httpx.post(
        f"{server.base_url}/fine_tuning/jobs", headers={**headers, "Content-Type": "application/json"}
    )
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "The request body is missing."


def test_sdk_raises_bad_request_with_param(client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="x" * 65)
    assert caught.value.param == "suffix" and caught.value.request_id  # type: ignore[attr-defined]


def test_list_newest_first_with_paging_and_metadata_filter(server: ApiServer) -> None:
    with server.client(server.new_key("proj-joblist")) as client:
        file_id = client.files.create(file=chat_file(), purpose="fine-tune").id
        made = [
            client.fine_tuning.jobs.create(model=TINY, training_file=file_id, metadata=meta).id
            for meta in ({"team": "a"}, {"team": "b", "x": "1"}, None, {"team": "a", "x": "1"})
        ]
        newest = list(reversed(made))
        first = client.fine_tuning.jobs.list(limit=3)
        assert [j.id for j in first.data] == newest[:3] and first.has_more
        assert [j.id for j in client.fine_tuning.jobs.list(limit=3, after=newest[2]).data] == newest[3:]
        assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == newest  # auto-paging
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [made[3], made[0]]
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a", "x": "1"})] == [made[3]]
        assert [j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata": "null"})] == [made[2]]
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.list(limit=101)
        assert caught.value.param == "limit"  # type: ignore[attr-defined]


def test_events_auto_page_with_limit_2_newest_first_exactly_once(
    server: ApiServer, db, client, training_file: str
) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    transition(db, job.id, JobStatus.queued, message="Files validated, moving job to queued state")
    transition(db, job.id, JobStatus.running, message="Fine-tuning job started")
    for step in (1, 2, 3):
        data = {"step": step, "train_loss": 1.0 / step, "train_mean_token_accuracy": 0.5, "total_steps": 3}
        add_event(db, job.id, f"Step {step}/3: training loss={1.0 / step:.2f}", type="metrics", data=data)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.message for e in events] == [
        "Step 3/3: training loss=0.33",
        "Step 2/3: training loss=0.50",
        "Step 1/3: training loss=1.00",
        "Fine-tuning job started",
        "Files validated, moving job to queued state",
        f"Validating training file: {training_file}",
        "Created fine-tuning job",
    ]
    assert len({e.id for e in events}) == 7
    assert all(e.object == "fine_tuning.job.event" and e.id.startswith("ftevent-") for e in events)
    assert events[0].type == "metrics" and events[0].data == {
        "step": 3,
        "train_loss": 1 / 3,
        "train_mean_token_accuracy": 0.5,
        "total_steps": 3,
    }
    page = client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[5].id)
    assert [e.id for e in page.data] == [events[6].id] and page.has_more is False
    assert client.fine_tuning.jobs.list_events(job.id, limit=2).has_more is True
    assert len(client.fine_tuning.jobs.list_events(job.id).data) == 7  # default limit 20


def test_cancel_pause_resume_from_each_state(server: ApiServer, db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    jobs = client.fine_tuning.jobs
    validating = jobs.create(model=TINY, training_file=training_file)
    with pytest.raises(openai.BadRequestError):
        jobs.pause(validating.id)
    with pytest.raises(openai.BadRequestError):
        jobs.resume(validating.id)
    cancelled = jobs.cancel(validating.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError) as caught:
        jobs.cancel(validating.id)
    assert caught.value.status_code == 400
    assert caught.value.message.endswith(f"Job has already completed: {validating.id} (status: cancelled)")

    running = jobs.create(model=TINY, training_file=training_file)
    transition(db, running.id, JobStatus.queued, message="Files validated, moving job to queued state")
    transition(db, running.id, JobStatus.running, message="Fine-tuning job started")
    assert jobs.pause(running.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        jobs.pause(running.id)
    resumed = jobs.resume(running.id)
    assert resumed.status == "queued"
    with Session(db) as session:
        row = session.get(JobRow, _pk(db, running.id))
        assert row is not None and row.queue_token and row.queue_token.startswith(f"train_job:{running.id}:")
    assert jobs.pause(resumed.id).status == "paused"  # queued -> paused
    assert jobs.cancel(resumed.id).status == "cancelled"  # paused -> cancelled
    messages = [e.message for e in jobs.list_events(running.id)]
    assert messages[:4] == [
        "Fine-tuning job cancelled",
        "Fine-tuning job paused",
        "Fine-tuning job resumed",
        "Fine-tuning job paused",
    ]

    succeeded = jobs.create(model=TINY, training_file=training_file)
    for target in (JobStatus.queued, JobStatus.running, JobStatus.succeeded):
        transition(db, succeeded.id, target, message=f"-> {target}")
    with pytest.raises(openai.BadRequestError) as caught:
        jobs.cancel(succeeded.id)
    assert "status: succeeded" in caught.value.message


def _pk(engine, job_id: str) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT pk FROM job WHERE id = ?", (job_id,)).scalar())


def test_new_jobs_are_enqueued_for_validation(server: ApiServer, db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    import redis

    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    with Session(db) as session:
        row = session.get(JobRow, _pk(db, job.id))
        assert row is not None and row.queue_token and row.queue_token.startswith(f"validate_job:{job.id}:")
    connection = redis.Redis.from_url(server.settings.resolved_redis_url)
    try:
        assert connection.zscore(server.settings.queue_name, row.queue_token) is not None
    finally:
        connection.close()


def test_checkpoints_newest_first_with_cursors(db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    with Session(db) as session:
        project_id = session.get(JobRow, _pk(db, job.id)).project_id  # type: ignore[union-attr]
        for step in (10, 20, 30):
            session.add(CheckpointRow(
                id=f"ftckpt-{job.id[6:]}{step}", job_id=job.id, project_id=project_id, step_number=step,
                metrics={"step": step, "train_loss": 0.5}, fine_tuned_model_checkpoint=f"ft:{TINY}:proj-test::x:ckpt-step-{step}",
                storage_key=f"jobs/{job.id}/checkpoints/{step}",
            ))  # fmt: skip
        session.commit()
    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert [c.step_number for c in page.data] == [30, 20] and page.has_more
    assert (page.first_id, page.last_id) == (page.data[0].id, page.data[1].id)  # type: ignore[attr-defined]
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [30, 20, 10]
    checkpoint = page.data[0]
    assert checkpoint.object == "fine_tuning.job.checkpoint" and checkpoint.fine_tuning_job_id == job.id
    assert checkpoint.metrics.train_loss == 0.5 and checkpoint.fine_tuned_model_checkpoint.endswith(
        "ckpt-step-30"
    )


def test_checkpoints_of_a_deleted_model_are_not_listed(db, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="gone")
    name = f"ft:{TINY}:proj-test:gone:{job.id[6:]}"
    with Session(db) as session:
        project_id = session.get(JobRow, _pk(db, job.id)).project_id  # type: ignore[union-attr]
        for step in (10, 20, None):
            model_id = name if step is None else f"{name}:ckpt-step-{step}"
            session.add(ModelRow(id=model_id, project_id=project_id, job_id=job.id, base_model=TINY,
                                 storage_key=f"jobs/{job.id}/x", checkpoint_step=step))  # fmt: skip
            if step is not None:
                session.add(CheckpointRow(
                    id=f"ftckpt-{job.id[6:]}{step}", job_id=job.id, project_id=project_id, step_number=step,
                    fine_tuned_model_checkpoint=model_id, storage_key=f"jobs/{job.id}/checkpoints/{step}",
                ))  # fmt: skip
        session.commit()
    listed = lambda: [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]  # noqa: E731
    assert listed() == [20, 10]
    client.models.delete(f"{name}:ckpt-step-20")  # one checkpoint's model
    assert listed() == [10]
    client.models.delete(name)  # the final model takes its checkpoints with it
    assert listed() == []


def test_unknown_job_is_404(client) -> None:  # type: ignore[no-untyped-def]
    for call in (
        client.fine_tuning.jobs.retrieve,
        client.fine_tuning.jobs.cancel,
        client.fine_tuning.jobs.list_events,
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call("ftjob-nope")
        assert caught.value.request_id


def test_async_client_creates_and_lists(server: ApiServer, training_file: str) -> None:
    async def scenario() -> tuple[str, list[str], str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.key, max_retries=0) as client:
            job = await client.fine_tuning.jobs.create(
                model=TINY, training_file=training_file, suffix="async"
            )
            listed = [j.id async for j in client.fine_tuning.jobs.list(limit=2)]
            cancelled = await client.fine_tuning.jobs.cancel(job.id)
            return job.id, listed, cancelled.status

    job_id, listed, status = asyncio.run(scenario())
    assert job_id in listed and status == "cancelled"


def test_idempotency_key_returns_the_first_job(server: ApiServer, client, training_file: str) -> None:  # type: ignore[no-untyped-def]
    headers = {"Idempotency-Key": "job-create-1"}
    first = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, extra_headers=headers)
    retry = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, extra_headers=headers)
    assert retry.id == first.id and retry.seed == first.seed
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)].count(first.id) == 1
    assert client.fine_tuning.jobs.create(model=TINY, training_file=training_file).id != first.id
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=TINY, training_file=training_file, extra_headers={"Idempotency-Key": "x" * 300}
        )
    assert caught.value.param == "Idempotency-Key"  # type: ignore[attr-defined]


def test_concurrent_creates_with_one_idempotency_key_make_one_job(
    server: ApiServer, client, training_file: str
) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    headers = {"Idempotency-Key": "job-race"}
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda _: client.fine_tuning.jobs.create(model=TINY, training_file=training_file,
                                                                      extra_headers=headers).id, range(6)))  # fmt: skip
    assert len(set(ids)) == 1
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)].count(ids[0]) == 1
