"""Fixtures of the control-plane tests: one real `tuneworks api` process per test module (on its own FT_HOME and
the session's redis-server), its database opened directly for setting up states the worker would produce, and
generators of JSONL training data. No worker runs here, so jobs stay where the API puts them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from core.base_models import TINY
from core.db import make_engine
from core.settings import Settings
from tests.conftest import ApiServer, free_port


def chat_example(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"Question number {i}?"},
            {"role": "assistant", "content": f"Answer{i}"},
        ]
    }


def jsonl(examples: list) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in examples)


def chat_file(n: int = 12) -> bytes:
    return jsonl([chat_example(i) for i in range(n)])


def service_settings(home: Path, redis_url: str, **overrides: object) -> Settings:
    home.mkdir(parents=True, exist_ok=True)
    values: dict = {
        "home": home,
        "redis_url": redis_url,
        "queue_name": f"tuneworks:test:{home.name}",
        "api_port": free_port(),
        "api_metrics_port": free_port(),
        "base_models": TINY,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ApiServer]:
    """A real API process shared by the tests of one module; its key belongs to project `proj-test`."""
    home = tmp_path_factory.mktemp("api-home")
    api = ApiServer(service_settings(home, redis_url), home / "api.log")
    yield api
    api.stop()


def server_with_models(home: Path, redis_url: str, models_dir: Path, **overrides: object) -> ApiServer:
    """An API whose FT_HOME holds the prepared base models (export and import read the base weights)."""
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return ApiServer(service_settings(home, redis_url, **overrides), home / "api.log")


@pytest.fixture(scope="module")
def db(server: ApiServer) -> Iterator[Engine]:
    """The server's database, for arranging states (running jobs, checkpoints, models) the worker would write."""
    engine = make_engine(server.settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def client(server: ApiServer):  # type: ignore[no-untyped-def]
    with server.client() as sdk:
        yield sdk


@pytest.fixture
def training_file(client) -> str:  # type: ignore[no-untyped-def]
    return client.files.create(file=("train.jsonl", chat_file()), purpose="fine-tune").id
