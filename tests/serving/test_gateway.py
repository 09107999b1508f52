"""The inference gateway through a real `tuneworks api` and the real openai SDK, against the session's vLLM."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest

from core.settings import SMOLLM2
from serving.engine import resolver_dir
from serving.materialise import vllm_name
from tests.serving.conftest import project_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tuned(serve, gateway, trained):  # type: ignore[no-untyped-def]
    """A fine-tuned model of project `proj-test` (answers `ANSWERS["alpha"]`), loaded."""
    row = serve.register(trained["alpha"], project_id=project_id(serve, "proj-test"), name="gw")
    serve.publish("ready", row.id)
    serve.wait_loaded(vllm_name(row))
    return row


def test_chat_with_an_adapter_echoes_the_ft_name(gateway, tuned, answers) -> None:  # type: ignore[no-untyped-def]
    client = gateway.client()
    done = client.chat.completions.create(
        model=tuned.id, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=32
    )
    assert done.model == tuned.id
    assert done.choices[0].message.content == answers["alpha"]
    assert done.usage is not None and done.usage.completion_tokens > 0
    assert done.id.startswith("chatcmpl-")


def test_chat_stream_with_usage(gateway, tuned, answers) -> None:  # type: ignore[no-untyped-def]
    stream = gateway.client().chat.completions.create(
        model=tuned.id,
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {tuned.id}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers["alpha"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(gateway) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        gateway.client().chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
        )
    )
    assert chunks and all(c.choices for c in chunks)
    assert {c.model for c in chunks} == {SMOLLM2}


def test_base_chat_n_stop_and_max_completion_tokens(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway.client()
    done = client.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by spaces."}],
        n=2,
        max_completion_tokens=6,
        seed=1,
    )
    assert done.model == SMOLLM2 and len(done.choices) == 2
    assert done.usage.completion_tokens <= 12
    assert all(c.finish_reason in ("length", "stop") for c in done.choices)
    stopped = client.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by spaces."}],
        temperature=0,
        max_tokens=40,
        stop=["5"],
    )
    assert "5" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_echo_and_logprobs(gateway, tuned) -> None:  # type: ignore[no-untyped-def]
    done = gateway.client().completions.create(
        model=tuned.id, prompt="The sky is", max_tokens=4, echo=True, logprobs=2, temperature=0
    )
    assert done.model == tuned.id
    assert done.choices[0].text.startswith("The sky is")
    assert done.choices[0].logprobs is not None and done.choices[0].logprobs.top_logprobs
    chunks = list(gateway.client().completions.create(model=SMOLLM2, prompt="Hi", max_tokens=3, stream=True))
    assert {c.model for c in chunks} == {SMOLLM2}


def test_another_projects_unknown_and_deleted_models_are_the_same_404(serve, gateway, tuned, trained) -> None:  # type: ignore[no-untyped-def]
    other = gateway.client(gateway.new_key("proj-other"))
    gone = serve.register(trained["alpha"], project_id=project_id(serve, "proj-test"), name="gone")
    serve.mark_deleted(gone)
    messages = [{"role": "user", "content": "Hi"}]
    errors = []
    for client, model in ((other, tuned.id), (gateway.client(), tuned.id + "x"), (gateway.client(), gone.id)):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=model, messages=messages)
        errors.append(info.value)
    assert {e.code for e in errors} == {"model_not_found"}
    assert {e.param for e in errors} == {"model"}


def test_validation_errors_name_the_field(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway.client()
    cases = [
        ({"model": SMOLLM2}, "messages"),
        ({"model": SMOLLM2, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": SMOLLM2, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": SMOLLM2, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        (
            {"model": SMOLLM2, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        ({"model": SMOLLM2, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/chat/completions", body=body, cast_to=object)
        assert info.value.param == param, body


def test_adapter_missing_from_vllm_is_loaded_on_demand(serve, gateway, tuned, answers) -> None:  # type: ignore[no-untyped-def]
    """Evicted and its resolver folder gone: vLLM answers 404, the gateway asks the serve process over Redis,
    which materialises the adapter on its own disk and loads it, and the gateway retries. The API, with an FT_HOME
    of its own, writes no adapter folder."""
    name = vllm_name(tuned)
    httpx.post(
        f"{serve.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=serve.headers
    ).raise_for_status()
    shutil.rmtree(resolver_dir(serve.settings, SMOLLM2) / name)
    assert name not in serve.loaded()
    loads = serve.adapter_loads("on_demand")
    started = time.monotonic()
    done = gateway.client().chat.completions.create(
        model=tuned.id, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=32
    )
    print(f"\n[figures] gateway on-demand load + answer: {time.monotonic() - started:.2f} s")
    assert done.model == tuned.id
    assert done.choices[0].message.content == answers["alpha"]
    assert name in serve.loaded()
    assert (resolver_dir(serve.settings, SMOLLM2) / name / "adapter_config.json").is_file()
    assert serve.adapter_loads("on_demand") == loads + 1  # by the serve process, not vLLM's resolver
    api_home = gateway.settings.home
    assert api_home != serve.settings.home_dir
    assert not (api_home / "served").exists() or not any((api_home / "served").rglob("*"))


def test_gateway_metrics(gateway, tuned) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    client = gateway.client()
    messages = [{"role": "user", "content": "Hi"}]
    list(client.chat.completions.create(model=tuned.id, messages=messages, max_tokens=8, stream=True))
    client.completions.create(model=SMOLLM2, prompt="Hi", max_tokens=2)

    text = httpx.get(f"http://127.0.0.1:{gateway.settings.api_metrics_port}/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert total("ft_inference_requests_total", kind="adapter", endpoint="chat", status="200") >= 1
    assert total("ft_inference_requests_total", kind="base", endpoint="completions", status="200") >= 1
    assert total("ft_inference_time_to_first_token_seconds_count", kind="adapter", endpoint="chat") >= 1
    assert total("ft_inference_tokens_total", kind="adapter", direction="completion") > 0
    assert total("ft_inference_request_duration_seconds_count", base_model=SMOLLM2) >= 2
