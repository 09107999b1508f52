"""The python grader's sandbox: the user's `grade(sample, item)` in a separate, confined, short-lived process.

One process grades a whole batch of samples (`run_python`), so the runner pays the interpreter start once per
batch, not per sample. The process is a fresh interpreter (`python -I`: no PYTHON* variables, no user site) with
an empty environment, started in a new empty temporary folder that is deleted afterwards, in its own session so
that the whole group is killed at the wall-clock limit. What it does to itself is in `sandbox_child.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_STDOUT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """What one python grader process may use."""

    timeout_seconds: float = 30.0  # wall clock for the whole batch, then the process group is killed
    cpu_seconds: int = 30  # RLIMIT_CPU
    memory_bytes: int = 1024 * 1024 * 1024  # RLIMIT_AS (address space, so larger than resident memory)
    file_bytes: int = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file it may write (in its temporary folder)
    deny: tuple[str, ...] = ()  # folders it may not read (the artifact store, FT_HOME)


@dataclass
class PythonOutcome:
    """One sample's result: a finite `score`, or `error` (the user's traceback or why the process failed);
    `server_error` names a failure of the sandbox itself rather than of the user's code."""

    score: float | None = None
    error: str | None = None
    server_error: str | None = None


def run_python(
    source: str, pairs: list[tuple[dict[str, Any], Any]], *, limits: SandboxLimits
) -> list[PythonOutcome]:
    """`grade(sample, item)` of `source` for each pair, in one sandboxed process.

    Args:
        source: the grader's Python source, which must define `grade(sample, item) -> float`.
        pairs: (sample namespace, item) per sample.
        limits: time, CPU, memory and file limits, and the folders to deny.

    Returns:
        One outcome per pair, in order. Never raises for the user's code: a syntax error, an exception, a
        timeout or a crash is each sample's `error`.
    """
    if not pairs:
        return []
    request = {"source": source, "pairs": pairs, "deny": [os.path.realpath(p) for p in limits.deny],
               "limits": {"memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds,
                          "file_bytes": limits.file_bytes}}  # fmt: skip
    try:
        payload = json.dumps(request)
    except (TypeError, ValueError) as exc:
        return [PythonOutcome(server_error="sample_not_serializable", error=str(exc))] * len(pairs)
    with tempfile.TemporaryDirectory(prefix="tuneworks-grader-") as cwd:
        code, stdout, stderr = _run(payload, cwd=cwd, timeout=limits.timeout_seconds)
    if code is None:
        return [PythonOutcome(error=f"The grader was killed after {limits.timeout_seconds:g} s (wall-clock limit).")
                ] * len(pairs)  # fmt: skip
    return _outcomes(code, stdout, stderr, count=len(pairs), limits=limits)


def _run(payload: str, *, cwd: str, timeout: float) -> tuple[int | None, bytes, bytes]:
    """(exit code or None on timeout, stdout, stderr's tail) of the child."""
    process = subprocess.Popen(
        [sys.executable, "-I", str(_CHILD)], cwd=cwd, env={}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(payload.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return None, b"", b""
    finally:
        _kill_group(process)  # anything it left behind in its session
    return process.returncode, stdout[:MAX_STDOUT_BYTES], stderr[-4000:]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        process.communicate()


def _outcomes(
    code: int, stdout: bytes, stderr: bytes, *, count: int, limits: SandboxLimits
) -> list[PythonOutcome]:
    try:
        results = json.loads(stdout)["results"]
    except (ValueError, KeyError, TypeError):
        return [PythonOutcome(error=_crash(code, stderr, limits))] * count
    if not isinstance(results, list) or len(results) != count:
        return [PythonOutcome(error=_crash(code, stderr, limits))] * count
    return [_outcome(result) for result in results]


def _outcome(result: dict[str, Any]) -> PythonOutcome:
    score = result.get("score")
    if isinstance(score, float) and math.isfinite(score):
        return PythonOutcome(score=score)
    if score is not None:
        return PythonOutcome(error=f"grade() returned {score!r}, not a finite number")
    return PythonOutcome(error=str(result.get("error") or "grade() failed"))


def _crash(code: int, stderr: bytes, limits: SandboxLimits) -> str:
    if code == -signal.SIGXCPU or code == -signal.SIGKILL:
        return f"The grader was killed: CPU-time limit ({limits.cpu_seconds} s) reached."
    tail = stderr.decode(errors="replace").strip()[-2000:]
    memory = " (it may have reached the memory limit)" if "MemoryError" in tail else ""
    return f"The grader process exited with code {code}{memory}: {tail or 'no output'}"
