"""Serving figures of a real vLLM server run the way `tuneworks serve` runs it (serving.engine.VllmServer).

For each dtype in BENCH_VLLM_DTYPES (default "bfloat16,float32"): start-up time to a healthy server, the time of
`/v1/load_lora_adapter` and of the first request that uses the adapter, and tokens/s of 64-token completions:
one stream base, one stream adapter, 8 concurrent base, 8 concurrent half base / half adapter. The adapter is a
rank-16 LoRA on every projection with random (non-zero) weights, made with peft: speed does not depend on what
it learned.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from service.hardware import cpu_has_bf16
from service.settings import SMOLLM2, Settings

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _make_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
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


async def _rate(client: httpx.AsyncClient, url: str, models: list[str]) -> float:
    start = time.perf_counter()
    tokens = await asyncio.gather(*(_complete(client, url, m) for m in models))
    return round(sum(tokens) / (time.perf_counter() - start), 1)


async def _measure(dtype: str, home: Path, adapter: Path) -> dict[str, object]:
    from runner.models import ensure_prepared
    from serving.engine import VllmServer

    settings = Settings(home=home, vllm_dtype=dtype, vllm_base_port=8990, vllm_max_loras=2)
    server = VllmServer(settings=settings, model=ensure_prepared(settings, SMOLLM2))
    started = time.perf_counter()
    await server.start()
    figures: dict[str, object] = {"startup_seconds": round(time.perf_counter() - started, 1)}
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            t = time.perf_counter()
            load = await client.post(
                f"{server.url}/v1/load_lora_adapter", json={"lora_name": "bench", "lora_path": str(adapter)}
            )
            load.raise_for_status()
            figures["load_lora_adapter_seconds"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            await _complete(client, server.url, "bench")
            figures["first_adapter_request_seconds"] = round(time.perf_counter() - t, 2)
            await _complete(client, server.url, SMOLLM2)  # warm the base path too
            figures["tokens_per_second"] = {
                "base_1_stream": await _rate(client, server.url, [SMOLLM2]),
                "adapter_1_stream": await _rate(client, server.url, ["bench"]),
                "base_8_concurrent": await _rate(client, server.url, [SMOLLM2] * 8),
                "mixed_8_concurrent": await _rate(client, server.url, [SMOLLM2, "bench"] * 4),
            }
    finally:
        await server.terminate()
    return figures


def main() -> dict[str, object]:
    from runner.models import ensure_prepared

    dtypes = os.environ.get("BENCH_VLLM_DTYPES", "bfloat16,float32").split(",")
    result: dict[str, object] = {"cpu_flags_bf16": cpu_has_bf16()}
    base = ensure_prepared(Settings(), SMOLLM2).path
    with tempfile.TemporaryDirectory(prefix="tw-bench-serve-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(base.parent, target_is_directory=True)
        adapter = _make_adapter(base, home / "adapter")
        for dtype in dtypes:
            result[dtype] = asyncio.run(_measure(dtype, home, adapter))
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
