"""`tuneworks up`: the whole stack on one machine, as supervised child processes.

Children: Redis (only when FT_REDIS_URL is unset; its data lives in FT_HOME/redis), the API, one worker and the
inference supervisor (`tuneworks serve`, which runs vLLM). Each child gets its own process group; a child that
dies is restarted with backoff; Ctrl-C or SIGTERM stops every child's group cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()
        logger.info("%s: started (pid %s, log %s)", self.name, self.proc.pid, self.log_path)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(5)
        logger.info("%s: stopped", self.name)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def _redis_child(settings: Settings, logs: Path) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or set FT_REDIS_URL")
    port = 6390
    while not _port_free("127.0.0.1", port):
        port += 1
    data = settings.home_dir / "redis"
    data.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes"]
    return Child("redis", argv, dict(os.environ), logs / "redis.log"), f"redis://127.0.0.1:{port}/0"


def plan(settings: Settings) -> list[Child]:
    """The children `up` runs, in start order, with the environment each one gets."""
    logs = settings.home_dir / "logs"
    logs.mkdir(exist_ok=True)
    children: list[Child] = []
    env = {**os.environ, "FT_HOME": str(settings.home_dir)}
    if settings.redis_url is None:
        redis, url = _redis_child(settings, logs)
        children.append(redis)
        env["FT_REDIS_URL"] = url
    exe = [sys.executable, "-m", "tuneworks.cli"]
    for name in ("api", "worker", "serve"):
        child_env = dict(env)
        if name == "worker" and "FT_TRAIN_THREADS" not in os.environ:
            # The worker shares the CPU with vLLM here: torch with every core's worth of threads spins against
            # vLLM's OpenMP threads and runs several times slower than with half of them.
            child_env["FT_TRAIN_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        children.append(Child(name, [*exe, name], child_env, logs / f"{name}.log"))
    return children


def run_up(settings: Settings) -> int:
    """Start every child, supervise them until SIGINT/SIGTERM, then stop them all. Returns the exit code."""
    children = plan(settings)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    for child in children:
        child.start()
        if child.name == "redis":
            time.sleep(0.5)
    url = settings.public_url or f"http://{settings.api_host}:{settings.api_port}/v1"
    print(f"Tuneworks API: {url}  (logs in {settings.home_dir / 'logs'}; Ctrl-C stops)", flush=True)
    try:
        while not stopping:
            _supervise(children)
            time.sleep(0.5)
    finally:
        for child in reversed(children):
            child.stop()
    return 0


def _supervise(children: list[Child]) -> None:
    now = time.monotonic()
    for child in children:
        if child.proc is None or child.proc.poll() is None:
            if child.proc is None and now >= child.next_start:
                child.start()
            continue
        code = child.proc.returncode
        uptime = now - child.started_at
        child.restarts = 0 if uptime > 60 else child.restarts + 1
        delay = min(60.0, 2.0**child.restarts)
        logger.warning(
            "%s: exited with %s after %.0f s; restarting in %.0f s", child.name, code, uptime, delay
        )
        child.proc = None
        child.next_start = now + delay
