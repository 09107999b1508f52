"""Serving figures of a real vLLM server run the way `tuneworks serve` runs it (serving.engine.VllmServer).

For each dtype in BENCH_VLLM_DTYPES (default "auto", what `tuneworks serve` picks; "bfloat16,float32" compares):
- start-up time to a healthy server;
- hot-load latency of 4 new adapters: from the `/v1/load_lora_adapter` call that `tuneworks serve` makes when a
  job succeeds, to the first streamed token of a request to that adapter (p50 and max);
- aggregate tokens/s of 64-token completions at 8 concurrent requests: base only, one adapter, and four
  adapters mixed with base traffic (4 + 4), with their ratios to base only; plus one stream base and adapter.
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


def _make_adapter(base: Path, out: Path, *, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
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


async def _rate(client: httpx.AsyncClient, url: str, models: list[str]) -> float:
    start = time.perf_counter()
    tokens = await asyncio.gather(*(_complete(client, url, m) for m in models))
    return round(sum(tokens) / (time.perf_counter() - start), 1)


async def _measure(dtype: str, home: Path, adapters: list[Path]) -> dict[str, object]:
    from core.weights import ensure_prepared
    from serving.engine import VllmServer

    settings = Settings(home=home, vllm_dtype=dtype, vllm_base_port=8990, vllm_max_loras=len(adapters))
    server = VllmServer(settings=settings, model=ensure_prepared(settings, SMOLLM2))
    started = time.perf_counter()
    await server.start()
    figures: dict[str, object] = {
        "dtype": server.dtype(),
        "startup_seconds": round(time.perf_counter() - started, 1),
    }
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            await _complete(client, server.url, SMOLLM2)  # warm the base path
            figures["hot_load_to_first_token_seconds"] = await _hot_loads(client, server.url, adapters)
            names = [f"a{i}" for i in range(len(adapters))]
            base_8 = await _rate(client, server.url, [SMOLLM2] * 8)
            one_8 = await _rate(client, server.url, [names[0]] * 8)
            mixed_8 = await _rate(client, server.url, [SMOLLM2] * 4 + names[:4])
            figures["tokens_per_second"] = {
                "base_1_stream": await _rate(client, server.url, [SMOLLM2]),
                "adapter_1_stream": await _rate(client, server.url, [names[0]]),
                "base_8_concurrent": base_8,
                "one_adapter_8_concurrent": one_8,
                "four_adapters_plus_base_8_concurrent": mixed_8,
            }
            figures["ratio_to_base_8"] = {
                "one_adapter": round(one_8 / base_8, 2),
                "four_adapters_plus_base": round(mixed_8 / base_8, 2),
            }
    finally:
        await server.terminate()
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
    result: dict[str, object] = {"cpu_flags_bf16": cpu_has_bf16()}
    base = ensure_prepared(Settings(), SMOLLM2).path
    with tempfile.TemporaryDirectory(prefix="tw-bench-serve-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(base.parent, target_is_directory=True)
        adapters = [_make_adapter(base, home / f"adapter-{i}", seed=i) for i in range(4)]
        for dtype in dtypes:
            result[dtype] = asyncio.run(_measure(dtype, home, adapters))
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
