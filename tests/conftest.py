"""Session-wide test infrastructure: a real redis-server, prepared base models, free ports, settings.

Everything runs for real: Redis is a redis-server process started here, the database is SQLite in a temporary
FT_HOME, models are prepared once per session (SmolLM2 from the shipped GGUF, the tiny random model from it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Prepared models are kept between sessions here (git-ignored), so only the first run converts the GGUF.
MODELS_CACHE = Path(os.environ.get("FT_TEST_MODELS_DIR", REPO / ".tuneworks" / "test-models"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """A real redis-server on `port` (no persistence), once it accepts connections."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make install`"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*argv, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, proc=proc)
    return proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Prepared base models (tiny and SmolLM2), shared by every FT_HOME of the session."""
    from core.base_models import TINY
    from core.weights import ensure_prepared

    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    home = MODELS_CACHE.parent / "test-models-home"
    home.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(MODELS_CACHE, target_is_directory=True)
    ensure_prepared(Settings(home=home), TINY)
    return MODELS_CACHE


@pytest.fixture
def ft_home(tmp_path: Path, models_dir: Path) -> Path:
    """A fresh FT_HOME whose `models` folder is the session's prepared models."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


@pytest.fixture
def settings(ft_home: Path, redis_url: str) -> Settings:
    return Settings(home=ft_home, redis_url=redis_url, queue_name=f"tuneworks:test:{ft_home.parent.name}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        env[f"FT_{name.upper()}"] = str(value)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def tuneworks(*args: str, settings: Settings, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the `tuneworks` CLI as a user would, with `settings` as its FT_* environment."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "tuneworks"), *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        **kwargs,  # type: ignore[arg-type]
    )


class ApiServer:
    """A real `tuneworks api` process (uvicorn) and a key of one project."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.port = settings.api_port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "tuneworks"), "api"],
            env=settings_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=60, proc=self.proc)
        self.key = self.new_key("proj-test")

    def new_key(self, project: str) -> str:
        return tuneworks("keys", "create", "--project", project, settings=self.settings).stdout.strip()

    def client(self, key: str | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator:
    """Start API processes with given settings: `api_factory(settings)`; all are stopped at teardown."""
    servers: list[ApiServer] = []

    def start(settings: Settings) -> ApiServer:
        settings = settings.model_copy(update={"api_port": free_port()})
        server = ApiServer(settings, tmp_path / f"api-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def api(api_factory, settings: Settings) -> ApiServer:  # type: ignore[no-untyped-def]
    """A running API on a fresh FT_HOME and the session's Redis."""
    return api_factory(settings)
