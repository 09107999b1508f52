"""API latency under concurrency: job create / list / retrieve against a real `tuneworks api` on SQLite.

Starts its own redis-server and API process in a temporary FT_HOME, uploads one training file, then runs
`CONCURRENCY` async clients, each doing `ROUNDS` x (create job, list jobs, retrieve job). Writes
bench/results/api_latency.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int) -> None:
    for _ in range(300):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def _client(base: str, key: str, file_id: str, out: dict[str, list[float]]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(ROUNDS):
            t = time.perf_counter()
            job = (
                await client.post(
                    "/fine_tuning/jobs",
                    json={"model": "tuneworks/tiny-random-llama", "training_file": file_id},
                )
            ).json()
            out["create"].append(time.perf_counter() - t)
            t = time.perf_counter()
            (await client.get("/fine_tuning/jobs", params={"limit": 20})).raise_for_status()
            out["list"].append(time.perf_counter() - t)
            t = time.perf_counter()
            (await client.get(f"/fine_tuning/jobs/{job['id']}")).raise_for_status()
            out["retrieve"].append(time.perf_counter() - t)


async def _run(base: str, key: str, file_id: str) -> dict[str, object]:
    out: dict[str, list[float]] = {"create": [], "list": [], "retrieve": []}
    start = time.perf_counter()
    await asyncio.gather(*(_client(base, key, file_id, out) for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - start
    result: dict[str, object] = {"concurrency": CONCURRENCY, "rounds": ROUNDS, "wall_seconds": round(wall, 2)}
    total = sum(len(v) for v in out.values())
    result["requests_per_second"] = round(total / wall, 1)
    for name, values in out.items():
        result[name] = {
            "p50_ms": round(_pct(values, 0.5), 1),
            "p99_ms": round(_pct(values, 0.99), 1),
            "mean_ms": round(statistics.mean(values) * 1000, 1),
        }
    return result


def main() -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="tw-bench-api-"))
    redis_port, api_port = _port(), _port()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "FT_HOME": str(home),
        "FT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FT_API_PORT": str(api_port),
        "FT_LOG_LEVEL": "WARNING",
    }
    exe = [sys.executable, "-m", "tuneworks.cli"]
    api_log = open(os.environ.get("BENCH_API_LOG", os.devnull), "w")  # noqa: SIM115 (closed below)
    api = subprocess.Popen([*exe, "api"], env=env, stdout=subprocess.DEVNULL, stderr=api_log)
    try:
        _wait(api_port)
        key = subprocess.run(
            [*exe, "keys", "create", "--project", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        base = f"http://127.0.0.1:{api_port}/v1"
        lines = [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"},
                    ]
                }
            )
            for i in range(20)
        ]
        upload = httpx.post(
            f"{base}/files",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("t.jsonl", "\n".join(lines).encode())},
            data={"purpose": "fine-tune"},
        )
        upload.raise_for_status()
        result = asyncio.run(_run(base, key, upload.json()["id"]))
    finally:
        api.terminate()
        redis.terminate()
        api.wait(10)
        redis.wait(10)
        api_log.close()
        shutil.rmtree(home, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
