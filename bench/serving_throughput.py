"""Serving figures of a real vLLM server run the way `tuneworks serve` runs it (serving.engine.VllmServer).

For each dtype in BENCH_VLLM_DTYPES (default "auto", what `tuneworks serve` picks; "bfloat16,float32" compares)
and each LoRA op set in BENCH_LORA_OPS (default "vllm,tuneworks": vLLM's own PyTorch ops, started with
`TUNEWORKS_LORA_FIX_DISABLED=1`, then what the plugin installs: the fused layer of `serving.lora_ops`;
"segmented" is the plugin's six segmented ops under vLLM's per-slice wrapper, `TUNEWORKS_LORA_FUSED_DISABLED=1`),
one server each, one after another in the same run:
- start-up time to a healthy server;
- hot-load latency of 4 new adapters: from the `/v1/load_lora_adapter` call that `tuneworks serve` makes when a
  job succeeds, to the first streamed token of a request to that adapter (p50 and max);
- aggregate tokens/s of 64-token completions at 8 concurrent requests: base only, one adapter, and four
  adapters mixed with base traffic (4 + 4), with their ratios to base only; plus one stream base and adapter;
- a classification-like workload, one stream: news-length prompts (about 300-500 tokens, each different so no
  prefix cache hit) with `max_tokens` 8, base vs adapter, in prompt tokens/s and requests/s, where prefill
  dominates.
Every result names the CPU, its bf16 flags and the dtype; `side_by_side` puts the ratios of each op set together.
The adapters are rank-16 LoRAs on every projection with random (non-zero) weights, made with peft: speed does
not depend on what they learned.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from core.hardware import cpu_has_bf16
from core.settings import SMOLLM2, Settings

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
OPS_ENV = "TUNEWORKS_LORA_FIX_DISABLED"  # serving.lora_fix.DISABLE_ENV (bench does not import serving)
FUSED_ENV = "TUNEWORKS_LORA_FUSED_DISABLED"  # serving.lora_fix.FUSED_DISABLE_ENV
CLASSIFY_REQUESTS = 6
ROUNDS = int(os.environ.get("BENCH_SERVING_ROUNDS", "2"))  # fewer on a crowded machine
_TOPICS = ["markets", "football", "elections", "climate", "chip makers", "a film festival", "rail strikes"]
_SENTENCES = [
    "Officials said on {day} that the {topic} story was developing faster than analysts had expected.",
    "According to people familiar with the matter, {n} separate groups had raised concerns in recent weeks.",
    "The figures, published late on {day}, showed a change of {n} percent compared with the same period a year"
    " earlier, the largest move since records began.",
    "Critics argued that the decision about {topic} would leave smaller players exposed, while supporters said"
    " it was long overdue.",
    "Several regional newspapers carried the report on their front pages, and {n} readers wrote in to respond.",
    "A spokesperson declined to comment on the details but said a fuller statement would follow on {day}.",
]


def _article(i: int) -> str:
    """A news-length prompt (roughly 300-500 tokens). Article i and i + 63 share the body (so the same length)
    but not the first prefix-cache block, which holds the number: vLLM cannot reuse one's prefill for another."""
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
    body = i % 63
    topic = _TOPICS[body % len(_TOPICS)]
    lines = [f"Article {i + 1}: the latest on {topic}."]
    for k in range(14 + (body * 5) % 9):
        sentence = _SENTENCES[(body + k) % len(_SENTENCES)]
        lines.append(sentence.format(day=days[(body + k) % 5], topic=topic, n=3 + body + k))
    lines.append("Classify the article into one of: business, sport, politics, science, culture. Label:")
    return " ".join(lines)


def cpu_description() -> dict[str, object]:
    """The CPU's model name and the flags that decide bf16 speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    )
    return {
        "model": name,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_native": cpu_has_bf16(),
    }


def _make_adapter(base: Path, out: Path, *, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


async def _complete(client: httpx.AsyncClient, url: str, model: str) -> int:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    response = await client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])


async def _first_token(client: httpx.AsyncClient, url: str, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return


async def _classify(
    client: httpx.AsyncClient, url: str, models: list[str], first: int, requests: int = CLASSIFY_REQUESTS
) -> dict[str, dict[str, float]]:
    """One stream of classification requests (prefill-bound), alternating between `models` request by request
    so that each sees the same machine load: prompt tokens/s and requests/s per model. Model k gets articles
    `first + 63 k + i`: the same lengths for every model, and no shared prefix-cache block."""
    tokens = dict.fromkeys(models, 0)
    seconds = dict.fromkeys(models, 0.0)
    for i in range(requests):
        for k, model in enumerate(models):
            body = {"model": model, "prompt": _article(first + 63 * k + i), "max_tokens": 8, "temperature": 0}
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            seconds[model] += time.perf_counter() - start
            tokens[model] += int(response.json()["usage"]["prompt_tokens"])
    return {
        model: {
            "prompt_tokens_per_second": round(tokens[model] / seconds[model], 1),
            "requests_per_second": round(requests / seconds[model], 3),
            "mean_prompt_tokens": round(tokens[model] / requests),
        }
        for model in models
    }


async def _rate(client: httpx.AsyncClient, url: str, models: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = await asyncio.gather(*(_complete(client, url, m) for m in models))
    return sum(tokens), time.perf_counter() - start


async def _rates(client: httpx.AsyncClient, url: str, mixes: dict[str, list[str]]) -> dict[str, float]:
    """Tokens/s of each mix of concurrent requests, the mixes run in turn ROUNDS times (load drifts on a shared
    machine: interleaving gives each mix the same conditions, so the ratios hold even when the totals move)."""
    tokens = dict.fromkeys(mixes, 0)
    seconds = dict.fromkeys(mixes, 0.0)
    for _ in range(ROUNDS):
        for name, models in mixes.items():
            n, s = await _rate(client, url, models)
            tokens[name] += n
            seconds[name] += s
    return {name: round(tokens[name] / seconds[name], 1) for name in mixes}


async def _measure(dtype: str, ops: str, home: Path, adapters: list[Path]) -> dict[str, object]:
    from core.weights import ensure_prepared
    from serving.engine import VllmServer

    os.environ.pop(OPS_ENV, None)
    os.environ.pop(FUSED_ENV, None)
    if ops == "vllm":
        os.environ[OPS_ENV] = "1"  # the server inherits it: vLLM's own ops (and their index -1 bug)
    elif ops == "segmented":
        os.environ[FUSED_ENV] = "1"  # our six segmented ops under vLLM's per-slice add_lora_linear
    else:
        assert ops == "tuneworks", f"unknown BENCH_LORA_OPS entry {ops!r}"
    settings = Settings(home=home, vllm_dtype=dtype, vllm_base_port=8990, vllm_max_loras=len(adapters))
    server = VllmServer(settings=settings, model=ensure_prepared(settings, SMOLLM2))
    started = time.perf_counter()
    await server.start()
    figures: dict[str, object] = {
        "lora_ops": ops,
        "dtype": server.dtype(),
        "cpu": cpu_description(),
        "startup_seconds": round(time.perf_counter() - started, 1),
    }
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            await _complete(client, server.url, SMOLLM2)  # warm the base path
            figures["hot_load_to_first_token_seconds"] = await _hot_loads(client, server.url, adapters)
            names = [f"a{i}" for i in range(len(adapters))]
            rates = await _rates(
                client,
                server.url,
                {
                    "base_8_concurrent": [SMOLLM2] * 8,
                    "one_adapter_8_concurrent": [names[0]] * 8,
                    "four_adapters_plus_base_8_concurrent": [SMOLLM2] * 4 + names[:4],
                },
            )
            streams = await _rates(
                client, server.url, {"base_1_stream": [SMOLLM2], "adapter_1_stream": [names[0]]}
            )
            figures["tokens_per_second"] = streams | rates
            await _classify(
                client, server.url, [names[0]], 126, requests=1
            )  # warm the adapter's prefill path
            cls = await _classify(client, server.url, [SMOLLM2, names[0]], 0)
            base_cls, adapter_cls = cls[SMOLLM2], cls[names[0]]
            figures["classification_1_stream"] = {"base": base_cls, "adapter": adapter_cls}
            base_8 = rates["base_8_concurrent"]
            figures["ratio_to_base"] = {
                "one_adapter_8_concurrent": round(rates["one_adapter_8_concurrent"] / base_8, 2),
                "four_adapters_plus_base_8_concurrent": round(
                    rates["four_adapters_plus_base_8_concurrent"] / base_8, 2
                ),
                "adapter_1_stream": round(streams["adapter_1_stream"] / streams["base_1_stream"], 2),
                "classification_1_stream": round(
                    adapter_cls["prompt_tokens_per_second"] / base_cls["prompt_tokens_per_second"], 2
                ),
            }
    finally:
        await server.terminate()
        os.environ.pop(OPS_ENV, None)
        os.environ.pop(FUSED_ENV, None)
    return figures


async def _hot_loads(client: httpx.AsyncClient, url: str, adapters: list[Path]) -> dict[str, object]:
    seconds = []
    for i, path in enumerate(adapters):
        start = time.perf_counter()
        load = await client.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": str(path)}
        )
        load.raise_for_status()
        await _first_token(client, url, f"a{i}")
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {
        "p50": round(seconds[len(seconds) // 2], 2),
        "max": round(seconds[-1], 2),
        "each": [round(x, 2) for x in seconds],
    }


def main() -> dict[str, object]:
    from core.weights import ensure_prepared

    dtypes = os.environ.get("BENCH_VLLM_DTYPES", "auto").split(",")
    op_sets = os.environ.get("BENCH_LORA_OPS", "vllm,tuneworks").split(",")
    result: dict[str, object] = {"cpu": cpu_description(), "cpu_flags_bf16": cpu_has_bf16()}
    side_by_side: dict[str, dict[str, object]] = {}
    base = ensure_prepared(Settings(), SMOLLM2).path
    with tempfile.TemporaryDirectory(prefix="tw-bench-serve-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(base.parent, target_is_directory=True)
        adapters = [_make_adapter(base, home / f"adapter-{i}", seed=i) for i in range(4)]
        for dtype in dtypes:
            per_ops: dict[str, object] = {}
            for ops in op_sets:
                figures = asyncio.run(_measure(dtype, ops, home, adapters))
                per_ops[ops] = figures
                side_by_side[f"{figures['dtype']} / {ops} ops"] = {
                    **figures["ratio_to_base"],  # type: ignore[dict-item]
                    "base_8_concurrent_tokens_per_second": figures["tokens_per_second"]["base_8_concurrent"],  # type: ignore[index]
                }
                print(json.dumps({f"{dtype} / {ops}": figures}, indent=2), flush=True)
            result[dtype] = per_ops
    result["side_by_side"] = side_by_side
    _print_table(side_by_side)
    return result


def _print_table(rows: dict[str, dict[str, object]]) -> None:
    columns = [
        "one_adapter_8_concurrent",
        "four_adapters_plus_base_8_concurrent",
        "adapter_1_stream",
        "classification_1_stream",
        "base_8_concurrent_tokens_per_second",
    ]
    print("ratio to base | " + " | ".join(columns), flush=True)
    for name, row in rows.items():
        print(f"{name} | " + " | ".join(str(row.get(c)) for c in columns), flush=True)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
