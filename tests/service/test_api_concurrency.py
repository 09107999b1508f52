"""No stall under concurrency: 64 clients on list and retrieve for a few seconds, every request answered.

A correctness test, not a benchmark (`make bench` measures speed with wrk): before the API ran every database
call in a session of its own thread, 64 concurrent list requests deadlocked the connection pool against the
thread pool and requests waited 30 s for a connection, then failed.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import ApiServer
from tests.service.conftest import chat_file

TINY = "tuneworks/tiny-random-llama"
CLIENTS = 64
SECONDS = 4.0
BOUND = 10.0  # generous: a request slower than this is a stall, whatever the machine


async def _hammer(base_url: str, key: str, paths: list[str]) -> tuple[int, list[str], float]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    headers = {"Authorization": f"Bearer {key}"}
    done, failures, slowest = 0, [], 0.0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as client:

        async def one_client(index: int) -> None:
            nonlocal done, slowest
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                started = time.monotonic()
                response = await client.get(paths[index % len(paths)])
                slowest = max(slowest, time.monotonic() - started)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                done += 1

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    return done, failures, slowest


def test_64_concurrent_clients_on_list_and_retrieve_never_stall(server: ApiServer, client) -> None:  # type: ignore[no-untyped-def]
    file_id = client.files.create(file=("train.jsonl", chat_file()), purpose="fine-tune").id
    jobs = [client.fine_tuning.jobs.create(model=TINY, training_file=file_id).id for _ in range(5)]
    paths = ["/fine_tuning/jobs?limit=20", *(f"/fine_tuning/jobs/{job}" for job in jobs)]
    done, failures, slowest = asyncio.run(_hammer(server.base_url, server.key, paths))
    print(f"\n[figures] {CLIENTS} clients x {SECONDS:.0f} s: {done} requests, slowest {slowest:.2f} s")
    assert not failures, failures[:3]
    assert slowest < BOUND, f"a request took {slowest:.1f} s"
    assert done >= CLIENTS  # every client got at least one answer
