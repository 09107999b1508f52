"""`ServedAdapters` against a stand-in vLLM (httpx.MockTransport) and a stand-in Redis: per-adapter locks,
load requests answered only for the process's own base model, malformed messages ignored, unique staging
folders. No vLLM server needed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.db import init_db, make_engine
from core.queue import ADAPTER_CHANNEL, LOAD_CHANNEL, AdapterEvent, LoadReply, LoadRequest
from core.settings import SMOLLM2, Settings
from core.storage import ArtifactStore
from core.tables import ModelRow
from serving.adapters import ServedAdapters
from serving.engine import resolver_dir
from serving.materialise import materialise, vllm_name

URL = "http://vllm.test"


class FakeVllm:
    """vLLM's adapter endpoints; loads of the names in `slow` wait until `release` is set."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.slow: set[str] = set()
        self.release = asyncio.Event()
        self.loads: list[str] = []
        self.after_listing: Callable[[], Awaitable[None]] | None = None  # run once, after a /v1/models answer

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": SMOLLM2}] + [{"id": name} for name in sorted(self.loaded)]
            hook, self.after_listing = self.after_listing, None
            if hook is not None:
                await hook()
            return httpx.Response(200, json={"data": data})
        name = json.loads(request.content)["lora_name"]
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.discard(name)
            return httpx.Response(200)
        self.loads.append(name)
        if name in self.slow:
            await self.release.wait()
        self.loaded.add(name)
        return httpx.Response(200)


class FakeRedis:
    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(self, channel: str, data: str) -> int:
        self.published.append((channel, data))
        return 1


@pytest.fixture
def home(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", base_models=SMOLLM2)


@pytest.fixture
def engine(home: Settings) -> Engine:
    engine = make_engine(home.resolved_database_url)
    init_db(engine)
    return engine


def _register(settings: Settings, engine: Engine, name: str, *, base_model: str = SMOLLM2) -> ModelRow:
    store = ArtifactStore(settings.artifacts_dir)
    key = f"jobs/ftjob-{name}/adapter"
    folder = store.path(key)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "elsewhere"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    row = ModelRow(
        id=f"ft:{name}", project_id="p", job_id=f"ftjob-{name}", base_model=base_model, storage_key=key
    )
    with Session(engine, expire_on_commit=False) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return row


def _adapters(settings: Settings, engine: Engine, client: httpx.AsyncClient) -> ServedAdapters:
    store = ArtifactStore(settings.artifacts_dir)
    return ServedAdapters(
        settings=settings, engine=engine, store=store, base_model=SMOLLM2, url=URL, client=client
    )


def _message(channel: str, data: bytes) -> dict[str, Any]:
    return {"type": "message", "channel": channel.encode(), "data": data}


def test_a_slow_load_does_not_hold_up_another_adapter(home: Settings, engine: Engine) -> None:
    slow, fast = _register(home, engine, "slow"), _register(home, engine, "fast")

    async def scenario() -> None:
        vllm = FakeVllm()
        vllm.slow.add(vllm_name(slow))
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
            adapters = _adapters(home, engine, client)
            pending = asyncio.create_task(adapters.on_event(AdapterEvent(event="ready", model=slow.id)))
            while vllm_name(slow) not in vllm.loads:  # the slow load is in vLLM, holding its adapter's lock
                await asyncio.sleep(0.01)
            await asyncio.wait_for(adapters.on_event(AdapterEvent(event="ready", model=fast.id)), 5)
            assert vllm.loaded == {vllm_name(fast)} and not pending.done()
            vllm.release.set()
            await asyncio.wait_for(pending, 5)
            assert vllm.loaded == {vllm_name(slow), vllm_name(fast)}

    asyncio.run(scenario())


def test_load_requests_are_answered_only_for_the_own_base_model(home: Settings, engine: Engine) -> None:
    row = _register(home, engine, "wanted")
    redis = FakeRedis()

    async def scenario() -> None:
        vllm = FakeVllm()
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
            adapters = _adapters(home, engine, client)
            other = LoadRequest(model=row.id, base_model="org/other", reply_to="reply:other")
            adapters._dispatch(redis, _message(LOAD_CHANNEL, other.encode().encode()))
            adapters._dispatch(redis, _message(LOAD_CHANNEL, b'{"model": "ft:wanted"}'))  # malformed
            adapters._dispatch(redis, _message(ADAPTER_CHANNEL, b"not json"))
            assert not adapters._tasks
            await adapters.on_load_request(other, redis)  # called directly: ignored all the same
            own = LoadRequest(model=row.id, base_model=SMOLLM2, reply_to="reply:own")
            adapters._dispatch(redis, _message(LOAD_CHANNEL, own.encode().encode()))
            await asyncio.wait_for(asyncio.gather(*adapters._tasks), 5)
            assert vllm.loaded == {vllm_name(row)}

    asyncio.run(scenario())
    assert [channel for channel, _ in redis.published] == ["reply:own"]
    reply = LoadReply.decode(redis.published[0][1])
    assert reply is not None and reply.loaded and reply.model == row.id
    folder = resolver_dir(home, SMOLLM2) / vllm_name(row)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        home.models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct"
    )


def test_a_load_request_for_a_deleted_model_is_refused(home: Settings, engine: Engine) -> None:
    row = _register(home, engine, "gone")
    with Session(engine) as session:
        stored = session.get(ModelRow, row.pk)
        assert stored is not None
        stored.deleted = True
        session.add(stored)
        session.commit()
    redis = FakeRedis()

    async def scenario() -> None:
        vllm = FakeVllm()
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
            request = LoadRequest(model=row.id, base_model=SMOLLM2, reply_to="reply:gone")
            await _adapters(home, engine, client).on_load_request(request, redis)
            assert not vllm.loads

    asyncio.run(scenario())
    reply = LoadReply.decode(redis.published[0][1])
    assert reply is not None and not reply.loaded


def test_a_sweep_keeps_an_adapter_that_was_loaded_while_it_listed(home: Settings, engine: Engine) -> None:
    """An adapter registered and loaded (under its own lock) while a sweep is between its listings of vLLM and of
    the database is neither unloaded nor removed by that sweep."""
    first = _register(home, engine, "first")

    async def scenario() -> None:
        vllm = FakeVllm()
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
            adapters = _adapters(home, engine, client)
            await adapters.sync()
            assert vllm.loaded == {vllm_name(first)}

            async def meanwhile() -> None:
                late = _register(home, engine, "late")
                await adapters.on_event(AdapterEvent(event="ready", model=late.id))

            vllm.after_listing = meanwhile
            await adapters.sync()
            assert vllm.loaded == {vllm_name(first), "ftjob-late"}
            assert {p.name for p in resolver_dir(home, SMOLLM2).iterdir()} == vllm.loaded

    asyncio.run(scenario())


def test_a_sweep_drops_deleted_and_unknown_adapters(home: Settings, engine: Engine) -> None:
    kept, doomed = _register(home, engine, "kept"), _register(home, engine, "doomed")

    async def scenario() -> None:
        vllm = FakeVllm()
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
            adapters = _adapters(home, engine, client)
            await adapters.sync()
            vllm.loaded.add("stranger")
            (resolver_dir(home, SMOLLM2) / "stray").mkdir()
            with Session(engine) as session:
                stored = session.get(ModelRow, doomed.pk)
                assert stored is not None
                stored.deleted = True
                session.add(stored)
                session.commit()
            await adapters.sync()
            assert vllm.loaded == {vllm_name(kept)}
            assert {p.name for p in resolver_dir(home, SMOLLM2).iterdir()} == {vllm_name(kept)}

    asyncio.run(scenario())


def test_concurrent_materialisations_of_one_adapter_share_no_staging_folder(
    home: Settings, engine: Engine
) -> None:
    row = _register(home, engine, "twice")
    store = ArtifactStore(home.artifacts_dir)
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: materialise(settings=home, store=store, row=row), range(16)))
    assert set(folders) == {resolver_dir(home, SMOLLM2) / vllm_name(row)}
    assert [p.name for p in resolver_dir(home, SMOLLM2).iterdir()] == [vllm_name(row)]  # no staging left
    assert (folders[0] / "adapter_model.safetensors").read_bytes() == b"weights"
