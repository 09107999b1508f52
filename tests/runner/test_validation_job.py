"""Validation always ends: an unexpected error fails the job with a code, and a validation that keeps being
interrupted (arq's timeout here) fails with `too_many_attempts` instead of being enqueued again forever."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

import core.training_files
import runner.worker
from core.settings import Settings
from tests.runner.data import chat_lines, jsonl
from tests.runner.factory import Factory, burst


@pytest.mark.timeout(120)
def test_an_unexpected_error_fails_the_job_with_a_code(
    factory: Factory, wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(core.training_files, "validate_jsonl", broken)
    job_id = factory.job(jsonl(chat_lines(10)))
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error, factory.messages(job_id)
    assert job.error["code"] == "validation_failed"
    assert job.error["message"] == "Validating the files failed: RuntimeError: tokenizer exploded"
    burst(wsettings)  # the reconciler of the next worker leaves it alone
    assert factory.row(job_id).status == "failed"


@pytest.mark.timeout(120)
def test_a_validation_interrupted_too_often_fails(factory: Factory, wsettings: Settings) -> None:
    # What interrupted validations leave: still validating_files, every start counted.
    job_id = factory.job(jsonl(chat_lines(10)), attempts=wsettings.job_max_attempts)
    asyncio.run(factory.enqueue(job_id))
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "failed" and job.error and job.error["code"] == "too_many_attempts"
    assert job.error["message"] == "Validating the files was interrupted 3 times (the limit is 3)"


@pytest.mark.timeout(120)
def test_a_validation_that_always_times_out_is_not_retried_forever(
    factory: Factory, wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(2)  # longer than the function's timeout below

    monkeypatch.setattr(core.training_files, "validate_jsonl", slow)
    monkeypatch.setattr(runner.worker, "VALIDATE_TIMEOUT_SECONDS", 0.5)
    job_id = factory.job(jsonl(chat_lines(10)))
    asyncio.run(factory.enqueue(job_id))
    runs = 0
    while factory.row(job_id).status == "validating_files" and runs < 2 * wsettings.job_max_attempts:
        burst(wsettings)  # arq times the validation out; the next worker's reconciler enqueues it again
        runs += 1
    job = factory.row(job_id)
    assert job.status == "failed" and job.error and job.error["code"] == "too_many_attempts"
    assert runs <= wsettings.job_max_attempts + 1


@pytest.mark.timeout(120)
def test_an_example_of_50000_messages_validates_and_trains(factory: Factory, wsettings: Settings) -> None:
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(50_000)]
    lines = [json.dumps({"messages": turns}).encode(), *chat_lines(9)]
    job_id = factory.job(jsonl(lines), hyperparameters={"n_epochs": 1, "batch_size": 5})
    asyncio.run(factory.enqueue(job_id))
    started = time.monotonic()
    burst(wsettings)
    job = factory.row(job_id)
    assert job.status == "succeeded", factory.messages(job_id)
    assert any("longer than 1024 tokens and were truncated" in m for m in factory.messages(job_id))
    assert time.monotonic() - started < 90  # rendering the template per answer took about 40 minutes
