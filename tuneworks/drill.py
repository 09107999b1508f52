"""`tuneworks drill`: a fault drill against a whole stack on this machine, with figures an operator can read.

It starts `tuneworks up` in a fresh `FT_HOME` (its own Redis, API, worker and vLLM), creates training jobs
through the API, and while they train it kills, with SIGKILL and at random moments:
- the worker, `--worker-kills` times, each time while a job is running and after it made progress;
- Redis, `--redis-kills` times, with jobs queued and running;
- vLLM, `--vllm-kills` times (the serve process restarts it);
- the API, `--api-kills` times, in the middle of an upload.

`tuneworks up` restarts whatever died. Then it waits for every job to end and reports: jobs lost (created but
not succeeded), jobs with more than one final model, duplicated events, files whose stored size disagrees with
their listing, and the time each fault took to recover from. Exit code 0 when nothing was lost or duplicated.

Every setting of the stack comes from the caller's `FT_*` environment (lease, reconcile interval, resume-state
interval, base model); the drill only picks its own home and free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.hardware import cpu_has_bf16

FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Plan:
    """What the drill does; the defaults are the operator's full drill."""

    worker_kills: int = 20
    redis_kills: int = 5
    vllm_kills: int = 1
    api_kills: int = 1
    jobs: int = 3
    examples: int = 60
    epochs: int = 12
    base_model: str = ""  # what the jobs fine-tune; default: the first of FT_BASE_MODELS
    seed: int = 0
    timeout: float = 3600.0  # the whole drill
    home: Path | None = None  # default: a fresh temporary folder


@dataclass
class Report:
    cpu: str
    plan: dict[str, Any]
    kills: Counter[str] = field(default_factory=Counter)
    recover_seconds: dict[str, list[float]] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> final status
    jobs_lost: int = 0
    jobs_with_several_models: int = 0
    duplicated_events: int = 0
    bad_files: int = 0
    models_answering: int = 0
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.jobs_lost or self.jobs_with_several_models or self.duplicated_events or self.bad_files
        )

    def recovered(self, fault: str, seconds: float) -> None:
        self.kills[fault] += 1
        self.recover_seconds.setdefault(fault, []).append(round(seconds, 2))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kills"], data["ok"] = dict(self.kills), self.ok
        return data

    def text(self) -> str:
        lines = [f"fault drill on {self.cpu}", f"  plan: {json.dumps(self.plan)}"]
        for fault, times in self.recover_seconds.items():
            median, worst = statistics.median(times), max(times)
            lines.append(
                f"  {fault}: killed {len(times)}x, recovered in median {median:.1f} s, max {worst:.1f} s"
            )
        finals = Counter(self.jobs.values())
        lines += [
            f"  jobs: {len(self.jobs)} created, final states {dict(finals)}",
            f"  jobs lost: {self.jobs_lost}",
            f"  jobs with more than one model: {self.jobs_with_several_models}",
            f"  duplicated events: {self.duplicated_events}",
            f"  files whose bytes disagree with their listing: {self.bad_files}",
            f"  fine-tuned models of the served base model answering afterwards: {self.models_answering}",
            f"  wall time: {self.wall_seconds:.0f} s",
            "  result: " + ("PASS" if self.ok else "FAIL"),
        ]
        return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model and whether it has bf16 units, for the report."""
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, bf16 units: {'yes' if cpu_has_bf16() else 'no'}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def training_jsonl(n: int, seed: int) -> bytes:
    """`n` chat examples of a small routing task, of varied lengths."""
    rng = random.Random(seed)
    teams = ["billing", "shipping", "accounts", "returns"]
    lines = []
    for i in range(n):
        team = teams[i % len(teams)]
        words = " ".join(
            rng.choice(["order", "card", "parcel", "login", "refund", "late"]) for _ in range(3 + i % 9)
        )
        messages = [
            {"role": "user", "content": f"Ticket {i}: {words}"},
            {"role": "assistant", "content": team},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


class Stack:
    """A `tuneworks up` in its own home, and the processes inside it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.api_port = int(env["FT_API_PORT"])
        self.vllm_port = int(env["FT_VLLM_BASE_PORT"])
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.log = (home / "up.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuneworks.cli", "up"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, check: Any, timeout: float, what: str) -> float:
        """Seconds until `check()` is true (polled every 0.2 s)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tuneworks up exited; see {self.home / 'up.log'}")
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                if check():
                    return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"{what} not back after {timeout:.0f} s; see {self.home / 'logs'}")

    def healthy(self) -> bool:
        return httpx.get(f"{self.base}/health", timeout=2).status_code == 200

    def pids(self, marker: str) -> list[int]:
        """Processes whose command line contains `marker` and whose environment has this drill's FT_HOME."""
        found = []
        home = f"FT_HOME={self.home}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in cmdline and home in environ:
                found.append(int(entry.name))
        return found

    def kill(self, marker: str) -> int:
        """SIGKILL every process of this stack matching `marker`, with its process group. Returns how many."""
        pids = self.pids(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class Client:
    """The few API calls the drill makes, with retries through restarts of the API."""

    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(60):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.HTTPError:
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
                continue
            if response.status_code in (429, 502, 503, 504):
                time.sleep(1.0)
                continue
            response.raise_for_status()
            return response.json()
        raise RuntimeError(f"{method} {path}: the API did not answer")

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("GET", "/fine_tuning/jobs", params={"limit": 100})["data"]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        events, after = [], None
        while True:
            params = {"limit": 100} | ({"after": after} if after else {})
            page = self.call("GET", f"/fine_tuning/jobs/{job_id}/events", params=params)
            events += page["data"]
            if not page["has_more"]:
                return events
            after = page["data"][-1]["id"]


class Drill:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.report = Report(cpu=cpu_name(), plan={k: str(v) for k, v in asdict(plan).items()})
        home = plan.home or Path(tempfile.mkdtemp(prefix="tuneworks-drill-"))
        home.mkdir(parents=True, exist_ok=True)
        # Its own stack: its own Redis (started by `up`), SQLite database and artifact folder inside its home.
        own = {"FT_REDIS_URL", "FT_DATABASE_URL", "FT_ARTIFACTS_URL"}
        env = {k: v for k, v in os.environ.items() if k not in own}
        env |= {"FT_HOME": str(home), "FT_API_PORT": str(_free_port()), "FT_VLLM_BASE_PORT": str(_free_port()),
                "FT_WORKER_METRICS_PORT": "0", "FT_SERVE_METRICS_PORT": "0", "FT_API_METRICS_PORT": "0"}  # fmt: skip
        self.served = env.get("FT_BASE_MODELS", "HuggingFaceTB/SmolLM2-135M-Instruct").split(",")[0].strip()
        self.base_model = plan.base_model or self.served  # what the jobs fine-tune
        self.stack = Stack(home, env)
        self.client: Client | None = None
        self.job_ids: list[str] = []
        self.training_file = ""

    # --- set-up ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.stack.wait(
            lambda: httpx.get(f"{self.stack.base}/ready", timeout=2).status_code == 200, 300, "API"
        )
        key = subprocess.run([sys.executable, "-m", "tuneworks.cli", "keys", "create", "--project", "drill"],
                             env=self.stack.env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        self.client = Client(self.stack.base, key)

    def create_jobs(self) -> None:
        assert self.client is not None
        data = training_jsonl(self.plan.examples, self.plan.seed)
        upload = self.client.call(
            "POST", "/files", files={"file": ("drill.jsonl", data)}, data={"purpose": "fine-tune"}
        )
        self.training_file = upload["id"]
        for _ in range(self.plan.jobs):
            self.create_job()

    def create_job(self) -> None:
        assert self.client is not None
        n = len(self.job_ids)
        hyperparameters = {"n_epochs": self.plan.epochs, "batch_size": 4}
        body = {"model": self.base_model, "training_file": self.training_file, "suffix": f"drill{n}", "seed": n,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}  # fmt: skip
        # The key makes a create that is retried across an API restart create one job, not two.
        job = self.client.call(
            "POST", "/fine_tuning/jobs", json=body, headers={"Idempotency-Key": f"drill-{n}"}
        )
        self.job_ids.append(job["id"])

    # --- faults ------------------------------------------------------------------------------------------------
    def running(self) -> bool:
        """Whether a drill job is training now."""
        marks = ",".join("?" * len(self.job_ids))
        with contextlib.closing(sqlite3.connect(self.stack.home / "tuneworks.db", timeout=30)) as db:
            rows = db.execute(
                f"SELECT count(*) FROM job WHERE status = 'running' AND id IN ({marks})", self.job_ids
            )
            return bool(rows.fetchone()[0])

    def progress(self) -> int:
        """Optimizer steps recorded so far over every drill job (metrics events in the database)."""
        marks = ",".join("?" * len(self.job_ids))
        with contextlib.closing(sqlite3.connect(self.stack.home / "tuneworks.db", timeout=30)) as db:
            query = f"SELECT count(*) FROM job_event WHERE type = 'metrics' AND job_id IN ({marks})"
            return int(db.execute(query, self.job_ids).fetchone()[0])

    def all_final(self) -> bool:
        assert self.client is not None
        return all(j["status"] in FINAL for j in self.client.jobs() if j["id"] in self.job_ids)

    def kill_worker(self) -> None:
        """Kill the worker at a random moment while a job trains, then time until training progresses again."""
        while True:
            if self.all_final():
                self.create_job()  # every job ended before the faults did: a kill must still hit training
            self.stack.wait(lambda: self.running() or self.all_final(), 600, "a running job")
            before = self.progress()
            self.stack.wait(
                lambda b=before: self.progress() > b or self.all_final(), 600, "training progress"
            )
            time.sleep(self.rng.uniform(0.0, 1.5))
            if not self.all_final() and self.stack.kill("tuneworks.cli worker"):
                break
            time.sleep(0.5)  # the job ended meanwhile, or `up` is still restarting the worker: try again
        killed_at = self.progress()
        seconds = self.stack.wait(
            lambda: self.progress() > killed_at or self.all_final(), 900, "training after a worker kill"
        )
        self.report.recovered("worker", seconds)

    def kill_redis(self) -> None:
        self.stack.kill("redis-server")
        before = self.progress()
        seconds = self.stack.wait(
            lambda: self.progress() > before or self.all_final(), 900, "training after a Redis kill"
        )
        self.report.recovered("redis", seconds)

    def kill_vllm(self) -> None:
        assert self.client is not None
        body = {"model": self.served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        self.stack.wait(lambda: self._answers(body), 600, "vLLM")
        self.stack.kill("vllm.entrypoints.openai.api_server")
        seconds = self.stack.wait(lambda: self._answers(body), 900, "vLLM after a kill")
        self.report.recovered("vllm", seconds)

    def _answers(self, body: dict[str, Any]) -> bool:
        assert self.client is not None
        response = self.client.http.post("/chat/completions", json=body, timeout=120)
        return response.status_code == 200

    def kill_api_mid_upload(self) -> None:
        assert self.client is not None
        data = training_jsonl(
            40_000, self.plan.seed + 1
        )  # a few MB: the upload is still streaming at the kill
        thread = threading.Thread(target=self._upload_ignoring_errors, args=(data,), daemon=True)
        thread.start()
        time.sleep(self.rng.uniform(0.05, 0.3))
        self.stack.kill("tuneworks.cli api")
        seconds = self.stack.wait(self.stack.healthy, 300, "the API after a kill")
        thread.join(60)
        self.report.recovered("api", seconds)

    def _upload_ignoring_errors(self, data: bytes) -> None:
        assert self.client is not None
        with contextlib.suppress(httpx.HTTPError):
            self.client.http.post(
                "/files", files={"file": ("big.jsonl", data)}, data={"purpose": "fine-tune"}
            )

    def faults(self) -> None:
        schedule = (["worker"] * self.plan.worker_kills + ["redis"] * self.plan.redis_kills
                    + ["vllm"] * self.plan.vllm_kills + ["api"] * self.plan.api_kills)  # fmt: skip
        self.rng.shuffle(schedule)
        actions = {"worker": self.kill_worker, "redis": self.kill_redis, "vllm": self.kill_vllm,
                   "api": self.kill_api_mid_upload}  # fmt: skip
        for fault in schedule:
            if fault == "redis" and self.all_final():
                self.create_job()  # every job ended before the faults did: kills must still hit training
            actions[fault]()

    # --- the verdict -------------------------------------------------------------------------------------------
    def verdict(self) -> None:
        assert self.client is not None
        self.stack.wait(self.all_final, self.plan.timeout, "every job to end")
        jobs = {j["id"]: j for j in self.client.jobs() if j["id"] in self.job_ids}
        self.report.jobs = {job_id: job["status"] for job_id, job in jobs.items()}
        self.report.jobs_lost = sum(1 for job in jobs.values() if job["status"] != "succeeded")
        self.report.jobs_with_several_models = self._several_models()
        self.report.duplicated_events = sum(self._duplicates(job_id) for job_id in jobs)
        self.report.bad_files = self._bad_files()
        self.report.models_answering = sum(self._model_answers(job) for job in jobs.values())

    def _several_models(self) -> int:
        with contextlib.closing(sqlite3.connect(self.stack.home / "tuneworks.db", timeout=30)) as db:
            query = (
                "SELECT job_id FROM model WHERE checkpoint_step IS NULL GROUP BY job_id HAVING count(*) > 1"
            )
            return len(db.execute(query).fetchall())

    def _duplicates(self, job_id: str) -> int:
        assert self.client is not None
        seen: Counter[str] = Counter()
        for event in self.client.events(job_id):
            if event["type"] == "metrics":
                seen[f"step {event['data']['step']}"] += 1
            elif event["message"].startswith(
                ("New fine-tuned model created", "The job has successfully completed")
            ):
                seen[event["message"]] += 1
        return sum(n - 1 for n in seen.values() if n > 1)

    def _bad_files(self) -> int:
        assert self.client is not None
        bad = 0
        for listed in self.client.call("GET", "/files", params={"limit": 100})["data"]:
            content = self.client.http.get(f"/files/{listed['id']}/content")
            bad += content.status_code != 200 or len(content.content) != listed["bytes"]
        return bad

    def _model_answers(self, job: dict[str, Any]) -> int:
        if not job.get("fine_tuned_model") or job["model"] != self.served:
            return 0  # only adapters of the served base model can answer
        body = {"model": job["fine_tuned_model"], "messages": [{"role": "user", "content": "Ticket 1: refund"}],
                "max_tokens": 4}  # fmt: skip
        try:
            self.stack.wait(lambda: self._answers(body), 300, f"model {job['fine_tuned_model']}")
        except TimeoutError:
            return 0
        return 1

    def run(self) -> Report:
        started = time.monotonic()
        try:
            self.start()
            self.create_jobs()
            self.faults()
            self.verdict()
        finally:
            self.report.wall_seconds = time.monotonic() - started
            self.stack.stop()
        return self.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tuneworks drill", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    defaults = Plan()
    for name in (
        "worker_kills",
        "redis_kills",
        "vllm_kills",
        "api_kills",
        "jobs",
        "examples",
        "epochs",
        "seed",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument(
        "--base-model", default="", help="model to fine-tune (default: the first of FT_BASE_MODELS)"
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds for the whole drill")
    parser.add_argument(
        "--home", type=Path, default=None, help="FT_HOME of the drill's stack (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    plan = Plan(**{k: v for k, v in vars(args).items() if k != "json"})
    report = Drill(plan).run()
    print(report.text(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
