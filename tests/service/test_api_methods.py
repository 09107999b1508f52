"""DPO, continued training and early stopping through the real API (a `tuneworks api` process) and a real burst
worker, driven by the openai SDK on the tiny model: SFT then DPO from the SFT model, a job from a checkpoint, early
stopping, and every new field's bad input as a 400 naming it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.base_models import TINY
from core.settings import Settings
from tests.conftest import ApiServer
from tests.runner.factory import run_burst
from tests.service.conftest import chat_file, jsonl, service_settings

pytestmark = pytest.mark.timeout(300)
MARKER = "Certainly."


def preference_file(n: int = 12) -> bytes:
    def pair(i: int) -> dict:
        answer = f"Answer{i}"
        return {"input": {"messages": [{"role": "user", "content": f"Question number {i}?"}]},
                "preferred_output": [{"role": "assistant", "content": f"{answer} {MARKER}"}],
                "non_preferred_output": [{"role": "assistant", "content": answer}]}  # fmt: skip

    return jsonl([pair(i) for i in range(n)])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path) -> Iterator[ApiServer]:
    """An API process whose FT_HOME has the prepared models, so that a burst worker can train its jobs."""
    home = tmp_path_factory.mktemp("methods-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    api = ApiServer(service_settings(home, redis_url), home / "api.log")
    yield api
    api.stop()


@pytest.fixture
def client(stack: ApiServer) -> Iterator[openai.OpenAI]:
    with stack.client() as sdk:
        yield sdk


def work(stack: ApiServer) -> None:
    """Run a burst worker (validation and training) on the API's queue until it is empty."""
    settings: Settings = stack.settings.model_copy(update={"train_threads": 1, "worker_metrics_port": 0})
    asyncio.run(run_burst(settings))


def upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("data.jsonl", data), purpose="fine-tune").id


def hp(**values: Any) -> dict:
    return {"n_epochs": 2, "batch_size": 4, **values}


def messages(client: openai.OpenAI, job_id: str) -> list[Any]:
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=100).data))


def test_sft_then_dpo_from_the_sft_model(stack: ApiServer, client: openai.OpenAI) -> None:
    sft = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, chat_file()), suffix="sft",
                                         method={"type": "supervised", "supervised": {"hyperparameters": hp()}},
                                         extra_body={"lora": {"rank": 8}})  # fmt: skip
    work(stack)
    sft = client.fine_tuning.jobs.retrieve(sft.id)
    assert sft.status == "succeeded" and sft.fine_tuned_model
    pairs = upload(client, preference_file())
    dpo = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=pairs, validation_file=pairs, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": hp(beta=0.2)}},
    )  # fmt: skip
    assert dpo.model == sft.fine_tuned_model and dpo.method.type == "dpo"
    assert dpo.lora["rank"] == 8 and dpo.lora["init_from"] == sft.fine_tuned_model  # type: ignore[attr-defined]
    work(stack)
    dpo = client.fine_tuning.jobs.retrieve(dpo.id)
    assert dpo.status == "succeeded", dpo.error
    assert dpo.fine_tuned_model == f"ft:{TINY}:proj-test:dpo:{dpo.id.removeprefix('ftjob-')}"
    resolved = dpo.method.dpo.hyperparameters  # type: ignore[union-attr]
    assert (resolved.beta, resolved.n_epochs, resolved.batch_size) == (0.2, 2, 4)
    events = messages(client, dpo.id)
    steps = [e.data for e in events if e.type == "metrics"]
    assert len(steps) == 6 and steps[0]["train_loss"] == pytest.approx(0.6931, abs=2e-3)  # type: ignore[index]
    assert {"train_reward_margin", "train_chosen_reward", "train_rejected_reward",
            "full_valid_preference_accuracy"} <= set(steps[-1])  # type: ignore[arg-type]  # fmt: skip
    evaluation = dpo.evaluation  # type: ignore[attr-defined]
    assert evaluation["n_examples"] == 12 and 0 <= evaluation["preference_accuracy"] <= 1
    assert any("preference accuracy=" in e.message for e in events)
    assert dpo.trained_tokens and dpo.trained_tokens > 0
    checkpoints = client.fine_tuning.jobs.checkpoints.list(sft.id).data
    from_checkpoint = client.fine_tuning.jobs.create(model=checkpoints[-1].fine_tuned_model_checkpoint,
                                                     training_file=upload(client, chat_file()),
                                                     method={"type": "supervised",
                                                             "supervised": {"hyperparameters": hp(n_epochs=1)}})  # fmt: skip
    work(stack)
    assert client.fine_tuning.jobs.retrieve(from_checkpoint.id).status == "succeeded"


def test_early_stopping_keeps_the_best_weights_and_says_so(stack: ApiServer, client: openai.OpenAI) -> None:
    other = jsonl([{"messages": [{"role": "user", "content": f"Question number {i}?"},
                                 {"role": "assistant", "content": "something else entirely"}]} for i in range(4)])  # fmt: skip
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload(client, chat_file(16)), validation_file=upload(client, other),
        method={"type": "supervised", "supervised": {"hyperparameters": hp(n_epochs=10, batch_size=2,
                                                                           learning_rate_multiplier=50)}},
        extra_body={"early_stopping": {"patience": 2}},
    )  # fmt: skip
    assert job.early_stopping == {"patience": 2, "min_delta": 0.0}  # type: ignore[attr-defined]
    work(stack)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    report = job.early_stopping  # type: ignore[attr-defined]
    assert (
        report["patience"] == 2
        and report["stopped_at_step"] < 80
        and report["best_step"] <= report["stopped_at_step"]
    )
    events = messages(client, job.id)
    assert any(e.message.startswith("Early stopping at step") for e in events)
    steps = [e.data for e in events if e.type == "metrics"]
    assert len(steps) == report["stopped_at_step"]
    assert job.trained_tokens == sum(s["tokens"] for s in steps)  # type: ignore[index]


def test_a_project_cannot_continue_from_another_projects_model(
    stack: ApiServer, client: openai.OpenAI
) -> None:
    mine = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, chat_file()),
                                          method={"type": "supervised", "supervised": {"hyperparameters": hp(n_epochs=1)}})  # fmt: skip
    work(stack)
    name = client.fine_tuning.jobs.retrieve(mine.id).fine_tuned_model
    assert name
    with stack.client(stack.new_key("proj-other")) as other, pytest.raises(openai.BadRequestError) as info:
        other.fine_tuning.jobs.create(model=name, training_file=upload(other, chat_file()))
    assert info.value.body["param"] == "model"  # type: ignore[index]


def bad(stack: ApiServer, client: openai.OpenAI, body: dict) -> tuple[int, dict]:
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    response = httpx.post(f"{stack.base_url}/fine_tuning/jobs", json=body,
                          headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)  # fmt: skip
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before  # nothing stored
    return response.status_code, response.json()["error"]


def test_bad_input_is_a_400_naming_the_field(stack: ApiServer, client: openai.OpenAI) -> None:
    chat, pairs = upload(client, chat_file()), upload(client, preference_file())
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
    sft = client.fine_tuning.jobs.create(model=TINY, training_file=chat, extra_body={"lora": {"rank": 4}},
                                         method={"type": "supervised", "supervised": {"hyperparameters": hp(n_epochs=1)}})  # fmt: skip
    work(stack)
    model = client.fine_tuning.jobs.retrieve(sft.id).fine_tuned_model
    cases = [
        ({"training_file": pairs}, "training_file"),  # a preference file for a supervised job
        ({"training_file": chat, "method": dpo}, "training_file"),  # and the reverse
        ({"training_file": pairs, "validation_file": chat, "method": dpo}, "validation_file"),
        (
            {"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
        ),  # fmt: skip
        ({"training_file": chat, "early_stopping": {"patience": 2}}, "early_stopping"),  # no validation file
        (
            {"training_file": chat, "validation_file": chat, "early_stopping": {"patience": 0}},
            "early_stopping.patience",
        ),
        (
            {
                "training_file": chat,
                "validation_file": chat,
                "early_stopping": {"patience": 1, "min_delta": -1},
            },
            "early_stopping.min_delta",
        ),  # fmt: skip
        (
            {"training_file": chat, "model": model, "lora": {"rank": 8}},
            "lora.rank",
        ),  # conflicts with its adapter
        (
            {"training_file": chat, "model": model, "lora": {"target_modules": ["q_proj"]}},
            "lora.target_modules",
        ),
        ({"training_file": chat, "model": f"{model}x"}, "model"),
        ({"training_file": chat, "model": f"{model}:ckpt-step-999"}, "model"),
    ]
    for extra, param in cases:
        status, error = bad(stack, client, {"model": TINY, **extra})
        assert (status, error["param"]) == (400, param), (extra, error)
    same_shape = client.fine_tuning.jobs.create(model=str(model), training_file=chat,
                                                extra_body={"lora": {"rank": 4, "dropout": 0.1}})  # fmt: skip
    assert same_shape.lora == {"rank": 4, "alpha": 32.0, "dropout": 0.1, "init_from": model}  # type: ignore[attr-defined]
    client.fine_tuning.jobs.cancel(same_shape.id)
    assert json.loads(json.dumps(same_shape.model_dump()))["model"] == model
