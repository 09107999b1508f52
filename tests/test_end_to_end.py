"""The whole product on the real SmolLM2: `tuneworks up` (own Redis, API, worker, vLLM), driven by the openai SDK.

Upload -> job -> events -> succeeded -> the fine-tuned model and a checkpoint answer through the gateway, base
answers stay base answers, and SIGTERM to `up` stops every child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from core.settings import SMOLLM2, Settings
from tests.conftest import REPO, free_port, settings_env
from tuneworks import demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tuneworks up exited early"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p, pp, _ in rows if pp in frontier and p not in found}
        found |= children
        frontier = children
    return found


@pytest.fixture
def stack(tmp_path: Path, models_dir: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    settings = Settings(home=home, api_port=free_port(), vllm_base_port=free_port(), worker_metrics_port=0)
    env = settings_env(settings)
    env.pop("FT_REDIS_URL", None)  # `up` starts its own Redis
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "tuneworks"), "up"],
        env=env,
        stdout=(tmp_path / "up.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{settings.api_port}"
    try:
        _wait_ready(f"{base}/ready", proc, 120)
        key = subprocess.run(
            [str(REPO / ".venv" / "bin" / "tuneworks"), "keys", "create", "--project", "e2e"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield proc, openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300), home
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _chat(client: openai.OpenAI, model: str, text: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_completion_tokens=40,
        messages=[{"role": "system", "content": demo.SYSTEM}, {"role": "user", "content": text}],
    )
    return reply.choices[0].message.content or ""


def _wait_inference(client: openai.OpenAI, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _chat(client, SMOLLM2, "hello")
            return
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(2)
    raise TimeoutError("vLLM did not come up")


def test_fine_tune_smollm2_and_serve_it(stack) -> None:  # type: ignore[no-untyped-def]
    proc, client, home = stack
    train, held_out = demo.tickets(48, seed=1), demo.tickets(12, seed=99)
    upload = client.files.create(file=("tickets.jsonl", demo.training_jsonl(train)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=SMOLLM2,
        training_file=upload.id,
        suffix="tickets",
        seed=7,
        method=demo.METHOD,
    )
    deadline = time.monotonic() + 900
    while job.status not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(3)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{SMOLLM2}:e2e:tickets:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens and job.trained_tokens > 0

    _wait_inference(client, 300)
    base_before = _chat(client, SMOLLM2, held_out[0][0])
    shaped = routed = 0
    for text, expected in held_out:
        got = _chat(client, job.fine_tuned_model, text)
        try:
            answer = json.loads(got)
        except ValueError:
            continue
        shaped += isinstance(answer, dict) and set(answer) == {"team", "priority"}
        routed += isinstance(answer, dict) and answer.get("team") == expected["team"]
    # The fine-tuned model learned the answer shape and the routing; the base model knows neither.
    assert shaped == len(held_out), f"only {shaped}/12 answers in the trained JSON shape"
    assert routed >= 10, f"only {routed}/12 tickets routed to the right team"
    assert _chat(client, SMOLLM2, held_out[0][0]) == base_before

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "no checkpoints"
    got = _chat(client, checkpoints[0].fine_tuned_model_checkpoint, held_out[1][0])
    assert got.strip(), "checkpoint model gave no answer"

    children = _descendants(proc.pid)
    assert children, "up has no children"
    proc.send_signal(signal.SIGTERM)
    proc.wait(90)
    time.sleep(1)
    alive = {pid for pid in children if Path(f"/proc/{pid}").exists()}
    assert not alive, f"children left running after SIGTERM: {alive}"
