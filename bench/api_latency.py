"""Control-plane speed: `GET /health`, job retrieve and job list measured server-side with `wrk`, job create at 16
concurrent clients, and upload validation of a 100 MB and a 1 GB training file, against one `tuneworks api` on
SQLite with its own local redis-server.

A Python load generator saturates these 2 cores before the API does, so the read endpoints are driven by `wrk`
(C, 2 threads, `BENCH_WRK_SECONDS` = 8 s per run) at `BENCH_CONNECTIONS` = 8, 64 and 256 connections, and the
same server's `/health` is the floor they are compared with. `bench/wrk_report.lua` prints each run's figures as
JSON (requests, socket errors, non-2xx, latency p50/p90/p99/max). Create (a write, plus an enqueue in Redis) uses
an asyncio + httpx client: 16 clients x 20 creates; everything created is then cancelled. Uploads are generated
on disk (chat JSONL, lines of a few hundred bytes), sent with `curl -F`, timed end to end while the API's VmRSS is
sampled every 50 ms, and deleted afterwards.

Environment:
    BENCH_API_TREE      source tree the API is started from (default: this repository). Another tree, e.g. a
                        `git worktree` of an older commit, is put first on PYTHONPATH and used as the working
                        directory, so its packages are imported instead of this repository's.
    BENCH_WRK_SECONDS   seconds per wrk run (8).
    BENCH_CONNECTIONS   comma-separated wrk connection counts (8,64,256).
    BENCH_JOBS          jobs created before the wrk runs, so that list has data (50).
    BENCH_CREATE_CLIENTS, BENCH_CREATE_ROUNDS   create benchmark (16 clients x 20 creates).
    BENCH_UPLOAD_MB     comma-separated upload sizes in MB of 10^6 bytes (100,1000; empty = no upload runs).
    BENCH_API_LOG       also copy the API's stderr (FT_LOG_LEVEL=WARNING) to this path.
    BENCH_DATABASE_URL  the API's FT_DATABASE_URL (default: SQLite in the run's FT_HOME), e.g. a PostgreSQL
                        `postgresql+psycopg://postgres@127.0.0.1:5432/bench` (an empty database per run).
    BENCH_RECOVER_SECONDS   after each load run, how long the endpoint may take to answer again (20); past that
                        the run is a stall and the API is restarted on the same FT_HOME, so the rest still runs.

Targets of the issue "Control-plane speed" are evaluated in `targets` (reported, never asserted).
`python -m bench.api_latency` prints the figures without writing bench/results/.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)  # .venv/bin/python under `make bench`
LUA = Path(__file__).resolve().parent / "wrk_report.lua"
MODEL = "tuneworks/tiny-random-llama"

TREE = Path(os.environ.get("BENCH_API_TREE") or REPO).resolve()
WRK_SECONDS = int(os.environ.get("BENCH_WRK_SECONDS", "8"))
WRK_THREADS = 2
WRK_TIMEOUT_S = 2  # a response slower than this is a wrk `timeout` error: a stall
STALL_MS = 1000  # a run whose slowest response took this long stalled, even without a timeout
CONNECTIONS = [int(c) for c in os.environ.get("BENCH_CONNECTIONS", "8,64,256").split(",") if c]
SEED_JOBS = int(os.environ.get("BENCH_JOBS", "50"))
CREATE_CLIENTS = int(os.environ.get("BENCH_CREATE_CLIENTS", "16"))
CREATE_ROUNDS = int(os.environ.get("BENCH_CREATE_ROUNDS", "20"))
UPLOAD_MB = [int(s) for s in os.environ.get("BENCH_UPLOAD_MB", "100,1000").split(",") if s]
MAX_UPLOAD_BYTES = 2 * 1024**3
RSS_EVERY_S = 0.05
CLIENT_TIMEOUT_S = 30  # create / cancel: a request slower than this is an error
RECOVER_S = float(
    os.environ.get("BENCH_RECOVER_SECONDS", "20")
)  # after a run, how long the API may take to answer


# --- processes ---------------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One redis-server and one `tuneworks api` in `home`. `restart()` replaces a stuck API process (same
    FT_HOME, database, port and key), so that one stall does not cost the rest of the benchmark."""

    def __init__(self, home: Path) -> None:
        self.home, self.log = home, home / "api.log"
        home.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.api_port = _port(), _port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
        self.env.update(
            FT_HOME=str(home),
            FT_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            FT_API_PORT=str(self.api_port),
            FT_API_METRICS_PORT="0",
            FT_LOG_LEVEL="WARNING",
            FT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        )
        if os.environ.get("BENCH_DATABASE_URL"):
            self.env["FT_DATABASE_URL"] = os.environ["BENCH_DATABASE_URL"]
        if TREE != REPO:
            self.env["PYTHONPATH"] = os.pathsep.join([str(TREE), *filter(None, [self.env.get("PYTHONPATH")])])
        self.exe = [str(PYTHON), "-m", "tuneworks.cli"]
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.api: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._start_api()
        self.key = subprocess.run(
            [*self.exe, "keys", "create", "--project", "bench"],
            cwd=TREE, env=self.env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    @property
    def pid(self) -> int:  # the API process (uvicorn runs in it: one worker)
        assert self.api is not None
        return self.api.pid

    def _start_api(self) -> None:
        with open(self.log, "ab") as log_file:
            self.api = subprocess.Popen(
                [*self.exe, "api"], cwd=TREE, env=self.env, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(
                    f"the API exited with {self.api.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the API did not answer /health within 60 s: {self.log.read_text()[-2000:]}")

    def _stop_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait()

    def restart(self) -> None:
        self._stop_api()
        self.restarts += 1
        with open(self.log, "a") as log_file:
            log_file.write(f"--- bench: API restarted ({self.restarts}) ---\n")
        self._start_api()

    def close(self) -> None:
        self._stop_api()
        self.redis.terminate()
        self.redis.wait(15)


@contextmanager
def _server(home: Path) -> Iterator[Server]:
    server = Server(home)
    try:
        yield server
    finally:
        server.close()


def _recovery(server: Server, path: str) -> float | None:
    """Seconds until `path` answers again after a load run (None: not within RECOVER_S; then the API is
    restarted)."""
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {server.key}"}
    while time.monotonic() - start < RECOVER_S:
        try:
            if httpx.get(server.base + path, headers=headers, timeout=2).status_code < 500:
                return round(time.monotonic() - start, 1)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return None


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- wrk -----------------------------------------------------------------------------------------------------
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")


def _wrk(server: Server, path: str, connections: int, seconds: int) -> dict[str, Any]:
    cpu0, load = _proc_cpu_seconds(server.pid), os.getloadavg()[0]
    out = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT_S}s",
         "-s", str(LUA), "-H", f"Authorization: Bearer {server.key}", server.base + path],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    cpu = _proc_cpu_seconds(server.pid) - cpu0
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    match = _NON_2XX.search(out)
    non_2xx = int(match.group(1)) if match else 0
    seconds_run = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    errors = {**raw["errors"], "non_2xx": non_2xx}
    return {
        "connections": connections,
        "requests": raw["requests"],
        "req_per_s": round(raw["requests"] / seconds_run, 1),
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p90_ms": round(lat["p90"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 1),
        "errors": errors,
        "errors_total": raw["errors"]["connect"]
        + raw["errors"]["read"]
        + raw["errors"]["write"]
        + raw["errors"]["timeout"]
        + max(non_2xx, raw["errors"]["status"]),
        "stalled": raw["errors"]["timeout"] > 0 or lat["max"] / 1000 >= STALL_MS,
        "api_cpu_percent": round(100 * cpu / seconds_run, 0),  # of one core; the API is one process
        "loadavg_1m_before": round(load, 2),
    }


def _read_endpoints(server: Server, job_id: str) -> dict[str, dict[str, dict[str, Any]]]:
    paths = {
        "health": "/health",
        "retrieve": f"/v1/fine_tuning/jobs/{job_id}",
        "list": "/v1/fine_tuning/jobs?limit=20",
    }
    for path in paths.values():  # warm-up, not recorded: first queries, prepared statements, pools
        _wrk(server, path, 8, 1)
    result: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in paths}
    for connections in CONNECTIONS:
        for name, path in paths.items():
            result[name][str(connections)] = figures = _wrk(server, path, connections, WRK_SECONDS)
            figures["recovered_after_s"] = recovered = _recovery(server, path)
            figures["stalled"] = figures["stalled"] or figures["requests"] == 0 or recovered is None
            figures["api_restarted"] = recovered is None
            print(f"  {name:8} c={connections:<3} {figures['req_per_s']:>8} req/s  p50 {figures['p50_ms']} ms  "
                  f"p99 {figures['p99_ms']} ms  max {figures['max_ms']} ms  errors {figures['errors_total']}  "
                  f"api cpu {figures['api_cpu_percent']}%  answers again after {recovered} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            if recovered is None:
                print(f"  the API did not answer {path} within {RECOVER_S:.0f} s: restarted", file=sys.stderr)
                server.restart()
            time.sleep(1)
    return result


# --- create, cancel ------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else 0.0


def _summary(times: list[float], errors: int, wall: float) -> dict[str, Any]:
    return {
        "requests": len(times), "errors": errors, "wall_seconds": round(wall, 2),
        "req_per_s": round(len(times) / wall, 1), "p50_ms": _pct(times, 0.5), "p90_ms": _pct(times, 0.9),
        "p99_ms": _pct(times, 0.99), "max_ms": round(max(times, default=0) * 1000, 1),
    }  # fmt: skip


async def _creates(server: Server, file_id: str) -> tuple[dict[str, Any], list[str]]:
    times: list[float] = []
    ids: list[str] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {server.key}"}
        async with httpx.AsyncClient(base_url=server.base, headers=headers, timeout=CLIENT_TIMEOUT_S) as http:
            for _ in range(CREATE_ROUNDS):
                t = time.perf_counter()
                try:
                    response = await http.post(
                        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id}
                    )
                except httpx.HTTPError:
                    response = None
                times.append(time.perf_counter() - t)
                if response is not None and response.status_code == 200:
                    ids.append(response.json()["id"])
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CREATE_CLIENTS)))
    result = _summary(times, errors, time.perf_counter() - start)
    return {"clients": CREATE_CLIENTS, "per_client": CREATE_ROUNDS, **result}, ids


async def _cancels(server: Server, ids: list[str]) -> dict[str, Any]:
    times: list[float] = []
    errors = 0
    queue = list(ids)

    async def client() -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {server.key}"}
        async with httpx.AsyncClient(base_url=server.base, headers=headers, timeout=CLIENT_TIMEOUT_S) as http:
            while queue:
                job_id = queue.pop()
                t = time.perf_counter()
                try:
                    response = await http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
                except httpx.HTTPError:
                    response = None
                times.append(time.perf_counter() - t)
                if (
                    response is None
                    or response.status_code != 200
                    or response.json().get("status") != "cancelled"
                ):
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CREATE_CLIENTS)))
    return {"clients": CREATE_CLIENTS, **_summary(times, errors, time.perf_counter() - start)}


def _answers_or_restart(server: Server, path: str, figures: dict[str, Any]) -> None:
    figures["recovered_after_s"] = recovered = _recovery(server, path)
    figures["api_restarted"] = recovered is None
    if recovered is None:
        print(f"  the API did not answer {path} within {RECOVER_S:.0f} s: restarted", file=sys.stderr)
        server.restart()


# --- uploads -------------------------------------------------------------------------------------------------
_VOCABULARY = (
    "the model adapter training data file job epoch batch token learning rate loss gradient checkpoint "
    "validation server request response user assistant system message answer question please explain why how "
    "when where which customer order invoice shipping delay refund account password reset support ticket "
    "weather forecast recipe kitchen garden travel flight hotel booking schedule meeting report summary chart "
    "python function error exception stack trace database query index table column value result"
)
_WORDS = _VOCABULARY.split()


def _generate(path: Path, size: int) -> int:
    """A chat JSONL training file of at least `size` bytes, written in blocks from a pool of varied examples
    (system / user / assistant, 200 to 700 bytes a line). Returns its size."""
    rng = random.Random(size)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize()

    pool = []
    for i in range(4096):
        example = {
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": f"{sentence(6, 24)}? (ticket {i})"},
                {
                    "role": "assistant",
                    "content": ". ".join(sentence(5, 18) for _ in range(rng.randint(1, 5))) + ".",
                },
            ]
        }
        pool.append((json.dumps(example) + "\n").encode())
    written = 0
    with open(path, "wb") as handle:
        while written < size:
            block = b"".join(rng.choices(pool, k=2048))
            handle.write(block)
            written += len(block)
    return written


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0.0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            self.samples += 1
            self._halt.wait(RSS_EVERY_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, _rss_mb(self.pid))


def _upload(server: Server, work: Path, megabytes: int) -> dict[str, Any]:
    path = work / f"upload-{megabytes}MB.jsonl"
    try:
        size = _generate(path, megabytes * 10**6)
        baseline = _rss_mb(server.pid)
        sampler = _RssSampler(server.pid)
        sampler.start()
        start = time.perf_counter()
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "1800", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {server.key}",
             "-F", "purpose=fine-tune", "-F", f"file=@{path}", f"{server.base}/v1/files"],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        sampler.stop()
    finally:
        path.unlink(missing_ok=True)
    body, _, code = out.stdout.rpartition("\n")
    try:
        uploaded = json.loads(body)
    except json.JSONDecodeError:
        uploaded = {"error": body[-500:] or out.stderr[-500:]}
    if "id" in uploaded:  # its stored bytes go too
        httpx.delete(
            f"{server.base}/v1/files/{uploaded['id']}", headers={"Authorization": f"Bearer {server.key}"}
        )
    result = {
        "bytes": size,
        "http_status": int(code) if code.isdigit() else None,
        "status": uploaded.get("status"),
        "status_details": uploaded.get("status_details"),
        "seconds": round(wall, 2),
        "mb_per_s": round(size / 1e6 / wall, 1),
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_mb": round(sampler.peak, 1),
        "rss_growth_mb": round(sampler.peak - baseline, 1),
        "rss_samples": sampler.samples,
    }
    if out.returncode or "id" not in uploaded:
        result["error"] = uploaded.get("error") or out.stderr[-500:]
    print(f"  upload {megabytes} MB: {result['status']} in {result['seconds']} s = {result['mb_per_s']} MB/s, "
          f"RSS {result['rss_baseline_mb']} -> peak {result['rss_peak_mb']} MB", file=sys.stderr, flush=True)  # fmt: skip
    return result


# --- machine, tree, log --------------------------------------------------------------------------------------
def _cpu() -> dict[str, Any]:
    model, flags = "", set[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not model:
            model = value.strip()
        elif name.strip() == "flags" and not flags:
            flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"model": model, "cores": os.cpu_count(), **{f: f in flags for f in wanted}}


def _commit(tree: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(tree), *args],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head} dirty" if git("status", "--porcelain") else head


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exceeded|Timeout|Cancelled\w*))(?::|$)")


def _log_summary(log: Path) -> dict[str, Any]:
    """What the API wrote (FT_LOG_LEVEL=WARNING): per API process (a stuck one is restarted), its `ERROR` lines
    and the exceptions that end its tracebacks, counted. A process terminated with requests in flight logs
    their cancellation at shutdown."""
    text = log.read_text(errors="replace") if log.exists() else ""
    if os.environ.get("BENCH_API_LOG"):
        shutil.copyfile(log, os.environ["BENCH_API_LOG"])
    processes = []
    for part in re.split(r"--- bench: API restarted \(\d+\) ---\n", text):
        lines = part.splitlines()
        errors = Counter(x.strip()[:160] for x in lines if x.startswith(("ERROR", "CRITICAL", "WARNING")))
        exceptions = Counter(m.group(1) + x[m.end(1) :][:120] for x in lines if (m := _EXCEPTION.match(x)))
        processes.append({
            "lines": len(lines),
            "log_lines": dict(errors.most_common(8)),
            "exceptions": dict(exceptions.most_common(8)),
        })  # fmt: skip
    return {"processes": processes}


# --- the benchmark -------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _targets(result: dict) -> dict[str, Any]:
    ends = result["endpoints"]
    c64 = "64" if "64" in ends["health"] else None
    runs = [r for e in ends.values() for r in e.values()]
    uploads = list(result["uploads"].values())
    targets: dict[str, Any] = {
        "no_errors_no_stalls": all(r["errors_total"] == 0 and not r["stalled"] for r in runs),
        "create_p99_under_100ms": result["create"]["p99_ms"] < 100 and result["create"]["errors"] == 0,
    }
    if c64:
        ratios = result["ratios"]
        targets.update(
            retrieve_p99_under_50ms_at_64=ends["retrieve"][c64]["p99_ms"] < 50,
            list_p99_under_50ms_at_64=ends["list"][c64]["p99_ms"] < 50,
            retrieve_at_least_0_2x_health_at_64=ratios["retrieve_vs_health_at_64"] >= 0.2,
            list_at_least_0_1x_health_at_64=ratios["list_vs_health_at_64"] >= 0.1,
        )
        if "64_over_8" in ratios:
            targets["throughput_64_at_least_0_8x_8"] = all(v >= 0.8 for v in ratios["64_over_8"].values())
    if uploads:
        targets["upload_processed"] = all(u["status"] == "processed" for u in uploads)
        targets["upload_at_least_50_mb_per_s"] = all(u["mb_per_s"] >= 50 for u in uploads)
        peaks = [u["rss_peak_mb"] for u in uploads]
        targets["upload_peak_rss_flat_within_100mb"] = max(peaks) - min(peaks) <= 100
    return targets


def main() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tw-bench-api-"))
    result: dict[str, Any] = {
        "tree": str(TREE),
        "commit": _commit(TREE),
        "cpu": _cpu(),
        "database": "postgresql"
        if os.environ.get("BENCH_DATABASE_URL", "").startswith("postgres")
        else "sqlite",
        "wrk": {"threads": WRK_THREADS, "seconds": WRK_SECONDS, "timeout_s": WRK_TIMEOUT_S},
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    print(f"api from {TREE} ({result['commit']})", file=sys.stderr, flush=True)
    try:
        with _server(work / "home") as server:
            auth = {"Authorization": f"Bearer {server.key}"}
            with httpx.Client(base_url=server.base, headers=auth, timeout=60) as http:
                lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                  {"role": "assistant", "content": f"a{i}"}]})
                         for i in range(20)]  # fmt: skip
                upload = http.post(
                    "/v1/files",
                    files={"file": ("t.jsonl", "\n".join(lines).encode())},
                    data={"purpose": "fine-tune"},
                )
                upload.raise_for_status()
                file_id = upload.json()["id"]
                seeded = []
                for _ in range(SEED_JOBS):
                    created = http.post(
                        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id}
                    )
                    created.raise_for_status()
                    seeded.append(created.json()["id"])
            result["jobs_seeded"] = len(seeded)
            ends = result["endpoints"] = _read_endpoints(server, seeded[len(seeded) // 2])
            ratios: dict[str, Any] = {}
            if "64" in ends["health"]:
                health = ends["health"]["64"]["req_per_s"]
                ratios["retrieve_vs_health_at_64"] = _ratio(ends["retrieve"]["64"]["req_per_s"], health)
                ratios["list_vs_health_at_64"] = _ratio(ends["list"]["64"]["req_per_s"], health)
            for hi in ("64", "256"):
                if hi in ends["health"] and "8" in ends["health"]:
                    ratios[f"{hi}_over_8"] = {
                        name: _ratio(runs[hi]["req_per_s"], runs["8"]["req_per_s"])
                        for name, runs in ends.items()
                    }
            result["ratios"] = ratios
            result["create"], created_ids = asyncio.run(_creates(server, file_id))
            _answers_or_restart(server, "/v1/fine_tuning/jobs?limit=1", result["create"])
            print(f"  create: p50 {result['create']['p50_ms']} ms  p99 {result['create']['p99_ms']} ms  "
                  f"max {result['create']['max_ms']} ms  errors {result['create']['errors']}",
                  file=sys.stderr, flush=True)  # fmt: skip
            result["cancel"] = asyncio.run(_cancels(server, created_ids + seeded))
            _answers_or_restart(server, "/v1/fine_tuning/jobs?limit=1", result["cancel"])
            result["uploads"] = {f"{mb}MB": _upload(server, work, mb) for mb in UPLOAD_MB}
            result["api_rss_end_mb"] = round(_rss_mb(server.pid), 1)
            result["api_restarts"] = server.restarts
        result["targets"] = _targets(result)
    finally:
        if "server" in locals():
            result["api_log"] = _log_summary(server.log)
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
