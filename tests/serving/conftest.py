"""One real `tuneworks serve` (vLLM on SmolLM2, `--max-loras 2`) for the whole serving session, plus helpers to
register adapters as the worker would (a ModelRow and the PEFT folder in the artifact store) without a worker,
and a real `tuneworks api` that, as in Kubernetes, shares only the database and the artifact store with it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import redis as redis_sync
from sqlmodel import Session, select

from core.base_models import BaseModel
from core.db import init_db, make_engine
from core.naming import fine_tuned_model_name
from core.queue import ADAPTER_CHANNEL, AdapterEvent, LoadReply, request_load
from core.settings import SMOLLM2, Settings
from core.storage import ArtifactStore
from core.tables import ModelRow, Project
from tests.conftest import REPO, free_port, settings_env
from tests.serving.lora_adapters import ANSWERS, adapter_dir


@pytest.fixture(scope="session")
def serve_home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    home = tmp_path_factory.mktemp("serve") / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


@pytest.fixture(scope="session")
def smollm2(serve_home: Path) -> BaseModel:
    from core.weights import ensure_prepared

    return ensure_prepared(Settings(home=serve_home), SMOLLM2)


@pytest.fixture(scope="session")
def trained(smollm2: BaseModel) -> dict[str, Path]:
    """name -> PEFT folder of a real adapter that answers `ANSWERS[name]` to anything."""
    return {name: adapter_dir(name, smollm2.path) for name in ("alpha", "beta")}


@pytest.fixture(scope="session")
def serve_settings(serve_home: Path, redis_url: str) -> Settings:
    return Settings(
        home=serve_home,
        redis_url=redis_url,
        queue_name="tuneworks:test:serving",
        base_models=SMOLLM2,
        vllm_base_port=free_port(),
        vllm_max_loras=2,
        vllm_max_cpu_loras=4,
        vllm_max_lora_rank=16,
        vllm_max_model_len=1024,
        serve_metrics_port=free_port(),
        vllm_start_timeout=300.0,
        # float32: the base-answer regression compares greedy texts exactly, and in bf16 (this CPU's `auto`)
        # a base answer can change with the batch it shares, though no adapter weight touches it.
        vllm_dtype="float32",
        vllm_api_key="tuneworks-test-vllm-key",
    )


class Serve:
    """The running `tuneworks serve` and ways to act like the rest of the stack around it."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.url = settings.vllm_url(SMOLLM2) or ""
        self.headers = settings.vllm_headers()  # vLLM requires the key, as in production
        self.port = int(self.url.rsplit(":", 1)[1])
        self.engine = make_engine(settings.resolved_database_url)
        init_db(self.engine)
        self.store = ArtifactStore(settings.artifacts_dir)
        self.redis = redis_sync.Redis.from_url(settings.resolved_redis_url)
        self.log = log
        self._log = log.open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "tuneworks"), "serve"],
            env=settings_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_healthy(timeout=settings.vllm_start_timeout)
        self.start_seconds = time.monotonic() - started
        self._jobs = 0

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tuneworks serve exited; see {self.log}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not healthy after {timeout} s; see {self.log}")

    def register(self, adapter: Path, *, project_id: str, name: str = "model") -> ModelRow:
        """Store `adapter` as a new job's adapter and add its ModelRow, as the worker does on success."""
        self._jobs += 1
        job_id = f"ftjob-test{os.getpid()}{self._jobs:03d}{name}"
        key = f"jobs/{job_id}/adapter"
        self.store.put_dir(key, adapter)
        model_id = fine_tuned_model_name(base_model=SMOLLM2, project="proj-test", suffix=name, job_id=job_id)
        row = ModelRow(id=model_id, project_id=project_id, job_id=job_id, base_model=SMOLLM2, storage_key=key)
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
        return row

    def mark_deleted(self, row: ModelRow) -> None:
        with Session(self.engine) as session:
            stored = session.exec(select(ModelRow).where(ModelRow.id == row.id)).one()
            stored.deleted = True
            session.add(stored)
            session.commit()

    def publish(self, event: Literal["ready", "deleted"], model: str) -> None:
        self.redis.publish(ADAPTER_CHANNEL, AdapterEvent(event=event, model=model).encode())

    def request_load(self, model: str, *, base_model: str, timeout: float) -> LoadReply | None:
        """Ask for an on-demand load on `LOAD_CHANNEL` as the gateway does, and wait for the reply."""
        from redis import asyncio as aioredis

        async def ask() -> LoadReply | None:
            client = aioredis.from_url(self.settings.resolved_redis_url)
            try:
                return await request_load(client, model=model, base_model=base_model, timeout=timeout)
            finally:
                await client.aclose()

        return asyncio.run(ask())

    def adapter_loads(self, trigger: str) -> float:
        """`ft_adapter_loads_total` of `trigger` (any result), from the serve process's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.settings.serve_metrics_port}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "ft_adapter_loads_total" and sample.labels.get("trigger") == trigger
        )

    def loaded(self) -> set[str]:
        data = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10).json()["data"]
        return {m["id"] for m in data if m["id"] != SMOLLM2}

    def wait_loaded(self, name: str, *, present: bool = True, timeout: float = 60.0) -> float:
        """Seconds until adapter `name` is (or is no longer) registered in vLLM."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if (name in self.loaded()) == present:
                return time.monotonic() - started
            time.sleep(0.05)
        raise TimeoutError(f"adapter {name} {'not loaded' if present else 'still loaded'} after {timeout} s")

    def chat(
        self, model: str, content: str, *, max_tokens: int = 24, client: httpx.Client | None = None
    ) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        body |= {"temperature": 0, "max_tokens": max_tokens}
        response = (client or httpx).post(  # type: ignore[attr-defined]
            f"{self.url}/v1/chat/completions", json=body, headers=self.headers, timeout=300
        )
        return response

    def vllm_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmdline and str(self.port).encode() in cmdline:
                pids.append(int(entry.name))
        return pids

    def kill_vllm(self) -> None:
        for pid in self.vllm_pids():
            os.killpg(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.vllm_pids():  # nothing may outlive the session
            os.killpg(pid, signal.SIGKILL)
        self.redis.close()
        self.engine.dispose()
        self._log.close()


@pytest.fixture(scope="session")
def serve(
    serve_settings: Settings, trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    server = Serve(serve_settings, tmp_path_factory.mktemp("serve-logs") / "serve.log")
    print(f"\n[figures] tuneworks serve -> vLLM healthy in {server.start_seconds:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def answers() -> dict[str, str]:
    return ANSWERS


def project_id(serve: Serve, name: str) -> str:
    with Session(serve.engine) as session:
        return session.exec(select(Project).where(Project.name == name)).one().id


@pytest.fixture(scope="session")
def gateway(serve: Serve, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `tuneworks api` whose `vllm_urls` point at the session's vLLM; key of project `proj-test`.

    As in Kubernetes, it has an FT_HOME of its own (no models, no served adapters) and shares only the database,
    the artifact store and Redis with the serve process.
    """
    from tests.conftest import ApiServer

    home = tmp_path_factory.mktemp("gateway-home") / "home"
    home.mkdir()
    # A new Settings, not `model_copy`: a copy would keep the serve's cached `home_dir`.
    settings = Settings(
        **serve.settings.model_dump()
        | {
            "home": home,
            "database_url": serve.settings.resolved_database_url,
            "artifacts_url": f"file://{serve.settings.artifacts_dir}",
            "api_port": free_port(),
            "api_metrics_port": free_port(),
            "vllm_urls": json.dumps({SMOLLM2: serve.url}),
        }
    )
    server = ApiServer(settings, tmp_path_factory.mktemp("gateway") / "api.log")
    yield server
    server.stop()
