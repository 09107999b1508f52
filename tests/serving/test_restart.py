"""vLLM dies: the gateway answers 503 with retry-after, `tuneworks serve` restarts it and loads adapters again.

Runs last in the serving suite (file order): it takes the session's vLLM down for about a minute."""

from __future__ import annotations

import time

import openai
import pytest

from serving.materialise import vllm_name
from tests.serving.conftest import project_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_vllm_restart_reloads_adapters_and_gateway_says_503_meanwhile(
    serve, gateway, trained, answers
) -> None:  # type: ignore[no-untyped-def]
    row = serve.register(trained["beta"], project_id=project_id(serve, "proj-test"), name="survivor")
    serve.publish("ready", row.id)
    serve.wait_loaded(vllm_name(row))
    serve.kill_vllm()
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=row.id, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 503
    assert info.value.code == "service_unavailable"
    assert float(info.value.response.headers["retry-after"]) > 0
    started = time.monotonic()
    serve.wait_healthy(timeout=300)
    print(f"\n[figures] vLLM restarted and healthy {time.monotonic() - started:.1f} s after the kill")
    serve.wait_loaded(vllm_name(row), timeout=60)
    done = client.chat.completions.create(
        model=row.id, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=32
    )
    assert done.choices[0].message.content == answers["beta"]
