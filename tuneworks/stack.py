"""`tuneworks up`: the whole stack on one machine, as supervised child processes.

Children: Redis (only when FT_REDIS_URL is unset; its data lives in FT_HOME/redis), the API, one worker and the
inference supervisor (`tuneworks serve`, which runs vLLM). Each child gets its own process group; a child that
dies is restarted with backoff; Ctrl-C or SIGTERM stops every child's group cleanly.

Nothing listens unauthenticated, even on 127.0.0.1 (other local users reach loopback too): our Redis requires a
password and vLLM a key, each generated once into FT_HOME (mode 0600) and kept across restarts. The password
reaches redis-server in a 0600 config file, never on its command line, and the children in their environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
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

STABLE_SECONDS = 10.0  # a child that lived this long is not crash-looping: restart it without backoff


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


def _private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (FT_HOME itself may be readable by others)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, also when an older file there had a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        # Before the secret is written: O_CREAT's mode applies only to a new file.
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


def kept_secret(path: Path) -> str:
    """A random token kept in `path` (mode 0600): made on the first call, read back on every later one.

    Args:
        path: the file; its folder must exist.

    Returns:
        The token; a new one is 43 URL-safe characters, fit for a URL's user-info or a config file as is.
    """
    if path.exists():
        path.chmod(0o600)
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, token + "\n")
    return token


def _redis_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _redis_child(settings: Settings, logs: Path) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or set FT_REDIS_URL")
    port = 6390
    while not _port_free("127.0.0.1", port):
        port += 1
    data = _private_dir(settings.home_dir / "redis")
    password = kept_secret(data / "password")
    config = data / "redis.conf"
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {_redis_quote(str(data))}",
        "appendonly yes",
        f"requirepass {_redis_quote(password)}",
    ]
    _write_private(config, "\n".join(lines) + "\n")
    child = Child("redis", [binary, str(config)], dict(os.environ), logs / "redis.log")
    return child, f"redis://:{password}@127.0.0.1:{port}/0"


def plan(settings: Settings) -> list[Child]:
    """The children `up` runs, in start order, with the argv and environment each one gets.

    Args:
        settings: `up`'s settings; without `redis_url` the plan starts its own Redis, without `vllm_api_key`
            it generates a key into FT_HOME/vllm_api_key.

    Returns:
        Redis (when planned), then the API, the worker and the inference supervisor. Only the API and the
        inference supervisor get the vLLM key: the worker never talks to vLLM.
    """
    # The API may log its Redis URL, password included: the logs are the owner's only.
    logs = _private_dir(settings.home_dir / "logs")
    children: list[Child] = []
    env = {**os.environ, "FT_HOME": str(settings.home_dir)}
    env.pop("FT_VLLM_API_KEY", None)
    if settings.redis_url is None:
        redis, env["FT_REDIS_URL"] = _redis_child(settings, logs)
        children.append(redis)
    else:
        env["FT_REDIS_URL"] = settings.redis_url
    vllm_key = settings.vllm_api_key or kept_secret(settings.home_dir / "vllm_api_key")
    exe = [sys.executable, "-m", "tuneworks.cli"]
    for name in ("api", "worker", "serve"):
        child_env = dict(env)
        if name in ("api", "serve"):
            child_env["FT_VLLM_API_KEY"] = vllm_key
        if name == "worker" and "FT_TRAIN_THREADS" not in os.environ:
            # The worker shares the CPU with vLLM here: torch with every core's worth of threads spins against
            # vLLM's OpenMP threads and runs several times slower than with half of them.
            child_env["FT_TRAIN_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        if name == "worker" and "LD_PRELOAD" not in os.environ and (tcmalloc := _tcmalloc()):
            # glibc malloc is slow for the trainer's allocation pattern; tcmalloc measured +38% tokens/s.
            child_env["LD_PRELOAD"] = tcmalloc
        children.append(Child(name, [*exe, name], child_env, logs / f"{name}.log"))
    return children


def _tcmalloc() -> str | None:
    """Debian's tcmalloc (`libtcmalloc-minimal4`) when it is installed, for preloading into the worker."""
    found = sorted(Path("/usr/lib").glob("*-linux-gnu/libtcmalloc_minimal.so.4"))
    return str(found[0]) if found else None


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
        # Backoff only for a crash loop: a child that ran for a while did work, and its death (a kill, an OOM)
        # is restarted at once; the fault drill kills the worker every few seconds and expects that.
        child.restarts = 0 if uptime > STABLE_SECONDS else child.restarts + 1
        delay = min(60.0, 2.0**child.restarts)
        logger.warning(
            "%s: exited with %s after %.0f s; restarting in %.0f s", child.name, code, uptime, delay
        )
        child.proc = None
        child.next_start = now + delay
