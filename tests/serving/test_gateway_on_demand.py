"""The gateway's on-demand loading against a stand-in vLLM (httpx.MockTransport), the session's real Redis and a
real `ServedAdapters` with an FT_HOME of its own: the API asks over Redis and retries once, or answers 503 with
retry-after when nobody loads the adapter. No vLLM server needed.

The models here are on the tiny base model, so that the session's real `tuneworks serve` (SmolLM2 only), which
listens on the same Redis, ignores these load requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from redis import asyncio as aioredis
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.base_models import TINY
from core.db import init_db, make_engine
from core.queue import LOAD_CHANNEL
from core.settings import Settings
from core.storage import ArtifactStore
from core.tables import ModelRow, Project
from service import gateway
from service.errors import ServiceUnavailable
from serving.adapters import ServedAdapters
from serving.engine import resolver_dir

URL = "http://vllm.test"
NAME = "ftjob-ondemand"  # the adapter's vLLM name


class FakeVllm:
    """Chat completions for the base model and the loaded adapters (404 for others), and the LoRA endpoints."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.load_status = 200
        self.chats: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": TINY}] + [{"id": name} for name in sorted(self.loaded)]
            return httpx.Response(200, json={"data": data})
        body = json.loads(request.content)
        if request.url.path == "/v1/load_lora_adapter":
            if self.load_status == 200:
                self.loaded.add(body["lora_name"])
            return httpx.Response(self.load_status, text="loaded" if self.load_status == 200 else "boom")
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200)
        self.chats.append(body["model"])
        if body["model"] != TINY and body["model"] not in self.loaded:
            return httpx.Response(
                404, json={"error": {"message": f"The model `{body['model']}` does not exist."}}
            )
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        return httpx.Response(
            200, json={"id": "chatcmpl-1", "model": body["model"], "choices": [choice], "usage": usage}
        )


@pytest.fixture
def shared(tmp_path: Path) -> dict[str, str]:
    """The only things the API and the serve process share: the database and the artifact store."""
    return {
        "database_url": f"sqlite:///{tmp_path / 'shared.db'}",
        "artifacts_url": f"file://{tmp_path / 'artifacts'}",
    }


def _settings(home: Path, shared: dict[str, str], redis_url: str) -> Settings:
    return Settings(
        home=home, redis_url=redis_url, base_models=TINY, vllm_urls=json.dumps({TINY: URL}), **shared
    )


@pytest.fixture
def api_settings(tmp_path: Path, shared: dict[str, str], redis_url: str) -> Settings:
    return _settings(tmp_path / "api-home", shared, redis_url)


@pytest.fixture
def serve_settings(tmp_path: Path, shared: dict[str, str], redis_url: str) -> Settings:
    return _settings(tmp_path / "serve-home", shared, redis_url)


@pytest.fixture
def engine(api_settings: Settings) -> Engine:
    engine = make_engine(api_settings.resolved_database_url)
    init_db(engine)
    return engine


@pytest.fixture
def model(api_settings: Settings, engine: Engine) -> tuple[Project, ModelRow]:
    """A project and its fine-tuned model on TINY, with the adapter in the shared artifact store."""
    key = f"jobs/{NAME}/adapter"
    folder = ArtifactStore(api_settings.artifacts_dir).path(key)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "elsewhere"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    project = Project(id="proj_ondemand", name="proj-ondemand")
    row = ModelRow(
        id=f"ft:{TINY}:proj-ondemand::ondemand",
        project_id=project.id,
        job_id=NAME,
        base_model=TINY,
        storage_key=key,
    )
    with Session(engine, expire_on_commit=False) as session:
        session.add(project)
        session.add(row)
        session.commit()
    return project, row


@asynccontextmanager
async def _serving(settings: Settings, vllm: FakeVllm, base_model: str = TINY) -> AsyncIterator[None]:
    """A `ServedAdapters` of `base_model` listening on Redis, until the block ends."""
    engine = make_engine(settings.resolved_database_url)
    async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as client:
        adapters = ServedAdapters(
            settings=settings,
            engine=engine,
            store=ArtifactStore(settings.artifacts_dir),
            base_model=base_model,
            url=URL,
            client=client,
        )
        redis = aioredis.from_url(settings.resolved_redis_url)
        before = await _listeners(redis)
        task = asyncio.create_task(adapters.listen(settings.resolved_redis_url))
        while await _listeners(redis) <= before:  # subscribed: a request published now reaches it
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await redis.aclose()
            engine.dispose()


async def _listeners(redis: Any) -> int:
    return int(dict(await redis.pubsub_numsub(LOAD_CHANNEL)).get(LOAD_CHANNEL.encode(), 0))


def _redis_of(settings: Settings) -> tuple[Callable[[], Awaitable[Any]], Any]:
    client = aioredis.from_url(settings.resolved_redis_url)

    async def get() -> Any:
        return client

    return get, client


async def _chat(
    settings: Settings, engine: Engine, project: Project, row: ModelRow, vllm: FakeVllm, redis: Any
) -> Any:
    state = SimpleNamespace(
        store=ArtifactStore(settings.artifacts_dir),
        inference_client=httpx.AsyncClient(transport=httpx.MockTransport(vllm)),
    )
    body = {"model": row.id, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        return await gateway.complete(
            state=state,
            settings=settings,
            engine=engine,
            project=project,
            endpoint="chat",
            body=body,
            redis=redis,
        )
    finally:
        await state.inference_client.aclose()


def test_the_serve_process_loads_the_adapter_and_the_gateway_retries(
    api_settings: Settings, serve_settings: Settings, engine: Engine, model: tuple[Project, ModelRow]
) -> None:
    project, row = model
    vllm = FakeVllm()

    async def scenario() -> Any:
        get, client = _redis_of(api_settings)
        try:
            async with _serving(serve_settings, vllm):
                return await _chat(api_settings, engine, project, row, vllm, get)
        finally:
            await client.aclose()

    response = asyncio.run(scenario())
    assert response.status_code == 200 and json.loads(response.body)["model"] == row.id
    assert vllm.chats == [NAME, NAME] and vllm.loaded == {NAME}
    assert (resolver_dir(serve_settings, TINY) / NAME / "adapter_config.json").is_file()
    assert not (api_settings.home_dir / "served").exists()


def test_no_redis_is_a_503_with_retry_after(
    api_settings: Settings, engine: Engine, model: tuple[Project, ModelRow]
) -> None:
    project, row = model

    async def no_redis() -> None:
        return None

    with pytest.raises(ServiceUnavailable) as caught:
        asyncio.run(_chat(api_settings, engine, project, row, FakeVllm(), no_redis))
    assert caught.value.status_code == 503 and float(caught.value.headers["retry-after"]) > 0


def test_a_serve_process_of_another_base_model_does_not_answer(
    api_settings: Settings,
    serve_settings: Settings,
    engine: Engine,
    model: tuple[Project, ModelRow],
) -> None:
    project, row = model
    vllm = FakeVllm()
    api_settings.on_demand_load_timeout = 1.0
    other = serve_settings.model_copy(update={"base_models": f"{TINY},org/other"})

    async def scenario() -> None:
        get, client = _redis_of(api_settings)
        try:
            async with _serving(other, vllm, base_model="org/other"):
                await _chat(api_settings, engine, project, row, vllm, get)
        finally:
            await client.aclose()

    with pytest.raises(ServiceUnavailable):
        asyncio.run(scenario())
    assert vllm.chats == [NAME] and not vllm.loaded


def test_a_failed_load_is_a_503(
    api_settings: Settings, serve_settings: Settings, engine: Engine, model: tuple[Project, ModelRow]
) -> None:
    project, row = model
    vllm = FakeVllm()
    vllm.load_status = 500

    async def scenario() -> None:
        get, client = _redis_of(api_settings)
        try:
            async with _serving(serve_settings, vllm):
                await _chat(api_settings, engine, project, row, vllm, get)
        finally:
            await client.aclose()

    with pytest.raises(ServiceUnavailable):
        asyncio.run(scenario())
    assert vllm.chats == [NAME] and not vllm.loaded
