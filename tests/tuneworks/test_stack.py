"""`tuneworks up`'s plan: Redis with a password and vLLM with a key, both generated once into FT_HOME and kept.

The planned redis-server is started for real from the plan's own argv, and must refuse a client without the
password.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from core.settings import Settings
from tests.conftest import wait_for_port
from tuneworks.stack import Child, plan

CHILDREN = ("api", "worker", "serve")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An FT_HOME, and an environment without FT_* variables (the plan copies the environment)."""
    for name in list(os.environ):
        if name.startswith("FT_"):
            monkeypatch.delenv(name)
    return tmp_path / "home"


def children(settings: Settings) -> dict[str, Child]:
    return {child.name: child for child in plan(settings)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_redis_gets_a_password_kept_in_ft_home_and_never_on_its_command_line(home: Path) -> None:
    first = children(Settings(home=home))
    password_file = home / "redis" / "password"
    password = password_file.read_text().strip()
    assert len(password) >= 32 and mode(password_file) == 0o600
    assert mode(home / "redis") == 0o700 and mode(home / "logs") == 0o700
    redis_child = first["redis"]
    assert not any(password in arg for arg in redis_child.argv), redis_child.argv
    config = Path(redis_child.argv[1])
    assert mode(config) == 0o600 and f'requirepass "{password}"' in config.read_text().splitlines()
    urls = {first[name].env["FT_REDIS_URL"] for name in CHILDREN}
    assert len(urls) == 1
    url = urlsplit(urls.pop())
    assert (url.scheme, url.username, url.password, url.hostname) == ("redis", "", password, "127.0.0.1")
    assert url.port is not None and f"port {url.port}" in config.read_text().splitlines()
    again = children(Settings(home=home))
    assert urlsplit(again["api"].env["FT_REDIS_URL"]).password == password
    assert password_file.read_text().strip() == password


def test_a_password_file_with_a_wider_mode_is_narrowed(home: Path) -> None:
    (home / "redis").mkdir(parents=True)
    (home / "redis" / "password").write_text("kept-password\n")
    (home / "redis" / "password").chmod(0o644)
    planned = children(Settings(home=home))
    assert urlsplit(planned["worker"].env["FT_REDIS_URL"]).password == "kept-password"
    assert mode(home / "redis" / "password") == 0o600


@pytest.fixture
def planned_redis(home: Path) -> Iterator[tuple[Child, str]]:
    """The plan's Redis child, started as `up` starts it, and the URL the other children get."""
    planned = children(Settings(home=home))
    child, url = planned["redis"], planned["api"].env["FT_REDIS_URL"]
    child.start()
    try:
        assert child.proc is not None
        wait_for_port(urlsplit(url).port or 0, proc=child.proc)
        yield child, url
    finally:
        child.stop()


@pytest.mark.timeout(60)
def test_the_planned_redis_refuses_clients_without_the_password(planned_redis: tuple[Child, str]) -> None:
    _, url = planned_redis
    port = urlsplit(url).port
    for stranger in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong@127.0.0.1:{port}/0"):
        with redis.Redis.from_url(stranger) as client, pytest.raises(redis.AuthenticationError):
            client.ping()
    with redis.Redis.from_url(url) as client:
        assert client.ping() is True


def test_an_external_redis_is_passed_as_given(home: Path) -> None:
    external = "redis://:theirs@redis.example:6379/2"
    planned = children(Settings(home=home, redis_url=external))
    assert "redis" not in planned
    assert all(planned[name].env["FT_REDIS_URL"] == external for name in CHILDREN)
    assert not (home / "redis").exists()


def test_vllm_gets_a_key_kept_in_ft_home_for_the_api_and_serve_only(home: Path) -> None:
    first = children(Settings(home=home))
    key_file = home / "vllm_api_key"
    key = key_file.read_text().strip()
    assert len(key) >= 32 and mode(key_file) == 0o600
    assert first["api"].env["FT_VLLM_API_KEY"] == key and first["serve"].env["FT_VLLM_API_KEY"] == key
    assert "FT_VLLM_API_KEY" not in first["worker"].env  # the worker never talks to vLLM
    assert all(key not in arg for child in first.values() for arg in child.argv)
    again = children(Settings(home=home))
    assert again["api"].env["FT_VLLM_API_KEY"] == again["serve"].env["FT_VLLM_API_KEY"] == key


def test_a_vllm_key_the_user_set_is_used_and_none_generated(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FT_VLLM_API_KEY", "the-users-key")
    planned = children(Settings(home=home))
    assert planned["api"].env["FT_VLLM_API_KEY"] == planned["serve"].env["FT_VLLM_API_KEY"] == "the-users-key"
    assert "FT_VLLM_API_KEY" not in planned["worker"].env
    assert not (home / "vllm_api_key").exists()
