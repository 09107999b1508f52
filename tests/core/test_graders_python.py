"""The python grader: OpenAI's `grade(sample, item)` contract, run in the sandboxed process with its limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.graders import (
    GradeContext,
    GraderError,
    SandboxLimits,
    check_runnable,
    grade,
    grade_batch,
    parse_grader,
)


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "adapter.bin").write_text("secret")
    return folder


@pytest.fixture
def context(secret_dir: Path) -> GradeContext:
    limits = SandboxLimits(
        timeout_seconds=8, cpu_seconds=4, memory_bytes=768 * 1024 * 1024, deny=(str(secret_dir),)
    )
    return GradeContext(python_graders=True, sandbox=limits)


def python(source: str) -> dict:
    return {"type": "python", "name": "py", "source": source}


def run(source: str, context: GradeContext, sample: str = "Paris", item: object = None):  # type: ignore[no-untyped-def]
    parsed = parse_grader(python(source))
    check_runnable(parsed, context=context)
    return grade(parsed, sample, item if item is not None else {"answer": "paris"}, context=context)


# OpenAI's graders guide: its python grader example (rapidfuzz's WRatio against the reference answer).
GUIDE_SOURCE = """
from rapidfuzz import fuzz, utils

def grade(sample, item) -> float:
    output_text = sample["output_text"]
    reference_answer = item["reference_answer"]
    return fuzz.WRatio(output_text, reference_answer, processor=utils.default_process) / 100.0
"""


def test_openai_guide_python_grader(context: GradeContext) -> None:
    exact = run(GUIDE_SOURCE, context, sample="Paris", item={"reference_answer": "paris"})
    assert exact.reward == 1.0 and not exact.errors.any
    near = run(GUIDE_SOURCE, context, sample="Pariss", item={"reference_answer": "paris"})
    assert 0.8 < near.reward < 1.0


def test_sample_namespace_and_output_json(context: GradeContext) -> None:
    source = (
        "def grade(sample, item):\n    return 1.0 if sample['output_json']['city'] == item['answer'] else 0.0"
    )
    assert run(source, context, sample='{"city": "paris"}').reward == 1.0
    assert run(source, context, sample='{"city": "rome"}').reward == 0.0


def test_runtime_error_is_reported_like_openai(context: GradeContext) -> None:
    result = run("def grade(sample, item):\n    return item['missing']", context)
    assert result.reward == 0.0 and result.errors.python_grader_runtime_error
    details = result.errors.python_grader_runtime_error_details or ""
    assert "KeyError: 'missing'" in details and "sandbox_child" not in details


@pytest.mark.parametrize("value", ["'high'", "None", "float('nan')", "True"])
def test_non_numbers_are_runtime_errors(context: GradeContext, value: str) -> None:
    result = run(f"def grade(sample, item):\n    return {value}", context)
    assert result.errors.python_grader_runtime_error and result.reward == 0.0


def test_scores_are_clamped_to_the_reward_range(context: GradeContext) -> None:
    high = run("def grade(sample, item):\n    return 7", context)
    assert high.reward == 1.0 and high.scores["raw_score"] == 7.0
    assert run("def grade(sample, item):\n    return -2", context).reward == 0.0


def test_batch_runs_in_one_fresh_process_with_an_empty_environment(context: GradeContext) -> None:
    source = "import os\ndef grade(sample, item):\n    return os.getpid() + len(os.environ) / 1000"
    parsed = parse_grader(python(source))
    results = grade_batch(parsed, ["a", "b", "c"], [{}, {}, {}], context=context)
    raws = {r.scores["raw_score"] for r in results}
    assert len(raws) == 1  # one process for the batch
    pid = int(raws.pop())
    assert pid != os.getpid()


def test_environment_and_working_folder(context: GradeContext) -> None:
    source = (
        "import os\n"
        "def grade(sample, item):\n"
        "    assert not set(os.environ) - {'LC_CTYPE'}, sorted(os.environ)\n"
        "    assert os.listdir('.') == [], os.listdir('.')\n"
        "    open('scratch.txt', 'w').write('ok')\n"
        "    return len(open('scratch.txt').read()) / 2"
    )
    result = run(source, context)
    assert result.reward == 1.0, result.errors.python_grader_runtime_error_details


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)", "not allowed"),
        ("import subprocess\n    subprocess.run(['true'])", "subprocess.Popen is not allowed"),
        ("import os\n    os.system('true')", "os.system is not allowed"),
        ("open('/tmp/tuneworks-grader-escape', 'w')", "writing /tmp/tuneworks-grader-escape is not allowed"),
        ("import ctypes\n    ctypes.CDLL(None)", "ctypes.dlopen is not allowed"),
    ],
)  # fmt: skip
def test_network_processes_and_writes_are_refused(context: GradeContext, body: str, expected: str) -> None:
    result = run(f"def grade(sample, item):\n    {body}\n    return 1", context)
    details = result.errors.python_grader_runtime_error_details or ""
    assert result.reward == 0.0 and expected in details, details
    assert not Path("/tmp/tuneworks-grader-escape").exists()


def test_network_namespace_has_no_route(context: GradeContext) -> None:
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    source = (
        "import socket\n"
        "def grade(sample, item):\n"
        "    return float(len(socket.if_nameindex()))"  # only a loopback, down, in a fresh namespace
    )
    assert run(source, context).scores["raw_score"] == 1.0


def test_artifact_store_is_denied(context: GradeContext, secret_dir: Path) -> None:
    for body in (
        f"open({str(secret_dir / 'adapter.bin')!r}).read()",
        f"__import__('os').listdir({str(secret_dir)!r})",
    ):
        result = run(f"def grade(sample, item):\n    {body}\n    return 1", context)
        assert f"access to {secret_dir}" in (result.errors.python_grader_runtime_error_details or "")


def test_wall_clock_limit_kills_the_grader(context: GradeContext) -> None:
    result = run("import time\ndef grade(sample, item):\n    time.sleep(60)\n    return 1", context)
    assert result.errors.python_grader_runtime_error
    assert "wall-clock limit" in (result.errors.python_grader_runtime_error_details or "")


def test_cpu_limit_kills_the_grader(secret_dir: Path) -> None:
    limits = SandboxLimits(timeout_seconds=60, cpu_seconds=1, deny=(str(secret_dir),))
    context = GradeContext(python_graders=True, sandbox=limits)
    result = run("def grade(sample, item):\n    while True:\n        pass", context)
    assert "CPU-time limit" in (result.errors.python_grader_runtime_error_details or "")


def test_memory_limit(context: GradeContext) -> None:
    result = run("def grade(sample, item):\n    block = bytearray(2 * 1024 ** 3)\n    return 1", context)
    assert "MemoryError" in (result.errors.python_grader_runtime_error_details or "")


def test_disabled_python_graders_say_how_to_enable() -> None:
    with pytest.raises(GraderError) as raised:
        check_runnable(parse_grader(python("def grade(s, i):\n    return 1")), context=GradeContext())
    assert raised.value.param == "grader.type" and "FT_PYTHON_GRADERS=1" in raised.value.message


@pytest.mark.parametrize("source", ["def grade(s, i) return 1", "x = 1"])
def test_source_that_cannot_run_is_refused_before_grading(context: GradeContext, source: str) -> None:
    with pytest.raises(GraderError) as raised:
        check_runnable(parse_grader(python(source)), context=context)
    assert raised.value.param == "grader.source"


def test_python_inside_multi(context: GradeContext) -> None:
    grader = {"type": "multi", "name": "m", "calculate_output": "0.5 * py + 0.5 * exact", "graders": {
        "py": python("def grade(sample, item):\n    return 0.5"),
        "exact": {"type": "string_check", "name": "e", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "operation": "ilike"}}}  # fmt: skip
    parsed = parse_grader(grader)
    check_runnable(parsed, context=context)
    result = grade(parsed, "Paris", {"answer": "paris"}, context=context)
    assert result.sub_rewards == {"py": 0.5, "exact": 1.0} and result.reward == 0.75


def test_grade_may_be_any_top_level_name(context: GradeContext) -> None:
    assert run("grade = lambda sample, item: 0.25", context).reward == 0.25
