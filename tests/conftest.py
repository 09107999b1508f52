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

from service.settings import Settings

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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make install`"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Prepared base models (tiny and SmolLM2), shared by every FT_HOME of the session."""
    from runner.models import ensure_prepared
    from service.base_models import TINY

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
