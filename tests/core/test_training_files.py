"""`validate_jsonl`: every problem key, exact line numbers and fields, formats, token counts, job errors."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.training_files import Report, read_lines, validate_jsonl

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
GOOD_LINE = json.dumps(GOOD).encode()


def lines_with(bad: object, *, at: int, total: int = 5) -> list[bytes]:
    """`total` good chat lines with `bad` (an object, or raw bytes) on line `at` (1-based)."""
    lines = [GOOD_LINE + b"\n" for _ in range(total)]
    lines[at - 1] = (bad if isinstance(bad, bytes) else json.dumps(bad).encode()) + b"\n"
    return lines


def msgs(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "Q"}
ASSISTANT = {"role": "assistant", "content": "A"}

CASES = [
    # key, bad line, expected field
    ("invalid_encoding", b'{"messages": "\xff\xfe"}', None),
    ("invalid_json", b'{"messages": [', None),
    ("data_type", json.dumps([1, 2]).encode(), None),
    ("data_type", msgs(USER, "not a message", ASSISTANT), "messages[1]"),
    ("missing_messages_list", {"messages": []}, "messages"),
    ("missing_messages_list", {"text": "hello"}, "messages"),
    ("message_missing_key", msgs({"content": "Q"}, ASSISTANT), "messages[0].role"),
    ("message_missing_key", msgs(USER, {"role": "assistant"}), "messages[1].content"),
    ("message_unrecognized_key", msgs(USER, {**ASSISTANT, "mood": "happy"}), "messages[1].mood"),
    ("unrecognized_role", msgs({"role": "bot", "content": "Q"}, ASSISTANT), "messages[0].role"),
    ("missing_content", msgs(USER, {"role": "assistant", "content": ""}), "messages[1].content"),
    ("missing_content", msgs({"role": "user", "content": 7}, ASSISTANT), "messages[0].content"),
    ("example_missing_assistant_message", msgs(USER, {"role": "system", "content": "S"}), "messages"),
    ("invalid_weight", msgs(USER, {**ASSISTANT, "weight": 0.5}), "messages[1].weight"),
    ("invalid_weight", msgs({**USER, "weight": 1}, ASSISTANT), "messages[0].weight"),
    ("invalid_tools", {**msgs(USER, ASSISTANT), "tools": [{"type": "function"}]}, "tools[0]"),
]


@pytest.mark.parametrize(("key", "bad", "field"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_problem_key_names_its_line_and_field(key: str, bad: object, field: str | None) -> None:
    report = validate_jsonl(lines_with(bad, at=4, total=6))
    assert report.counts == {key: 1}
    problem = report.problems[0]
    assert (problem.key, problem.line, problem.field) == (key, 4, field)
    assert report.n_examples == 6
    assert not report.ok(min_examples=1)
    assert report.summary().startswith(f"line 4{', ' + field if field else ''}: ")
    assert f"{key}: 1 line(s)" in report.summary()


def test_valid_chat_file_with_optional_keys_passes() -> None:
    examples = [
        msgs(
            {"role": "developer", "content": "Be terse."},
            USER,
            {**ASSISTANT, "weight": 0},
            {**ASSISTANT, "weight": 1},
        ),
        msgs(
            USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ASSISTANT,
        ),  # fmt: skip
        msgs(USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
        msgs({"role": "user", "content": [{"type": "text", "text": "parts"}]}, {**ASSISTANT, "name": "bot"}),
        {
            **msgs(USER, ASSISTANT),
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": False,
        },
    ]
    report = validate_jsonl(
        io.BytesIO(b"".join(json.dumps(e).encode() + b"\r\n" for e in examples) + b"\n\n")
    )
    assert report.counts == {}, report.problems
    assert (report.format, report.n_examples) == ("chat", 5)
    assert report.ok(min_examples=5) and not report.ok(min_examples=6)


def test_blank_lines_count_in_line_numbers_but_not_as_examples() -> None:
    data = [b"\n", GOOD_LINE + b"\n", b"   \r\n", b'{"messages": [{"role": "bot", "content": "x"}]}\n']
    report = validate_jsonl(data)
    assert report.n_examples == 2
    assert [(p.key, p.line) for p in report.problems] == [
        ("unrecognized_role", 4),
        ("example_missing_assistant_message", 4),
    ]


def test_byte_order_mark_on_the_first_line_is_tolerated() -> None:
    assert validate_jsonl([b"\xef\xbb\xbf" + GOOD_LINE + b"\n"]).counts == {}


def test_counts_are_lines_and_problems_are_capped_per_key_in_line_order() -> None:
    bad = msgs({"role": "bot", "content": "x"}, {"role": "alien", "content": "y"}, ASSISTANT)
    lines = [json.dumps(bad).encode() if i % 2 else GOOD_LINE for i in range(20)]
    report = validate_jsonl(lines)
    assert report.counts == {"unrecognized_role": 10}  # ten lines, two bad messages each
    assert [p.line for p in report.problems] == [2, 2, 4, 4, 6]
    assert [p.field for p in report.problems[:2]] == ["messages[0].role", "messages[1].role"]


def test_completion_format() -> None:
    good = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "", "completion": "x"}]
    assert validate_jsonl([json.dumps(e).encode() for e in good]).format == "completion"
    report = validate_jsonl([json.dumps(e).encode() for e in [*good, {"prompt": 1, "completion": "x"}]])
    assert [(p.key, p.line, p.field) for p in report.problems] == [("invalid_prompt_completion", 3, "prompt")]
    report = validate_jsonl([json.dumps({"prompt": "a", "completion": ""}).encode()])
    assert [(p.key, p.field) for p in report.problems] == [("missing_content", "completion")]


def test_one_format_per_file() -> None:
    data = [GOOD_LINE, GOOD_LINE, json.dumps({"prompt": "a", "completion": "b"}).encode()]
    report = validate_jsonl(data)
    assert report.format == "chat"
    assert [(p.key, p.line) for p in report.problems] == [("mixed_formats", 3)]


@pytest.mark.parametrize("spelling", ["output", "completion"])
def test_preference_format_both_spellings(spelling: str) -> None:
    example = {
        "input": {"messages": [USER]},
        f"preferred_{spelling}": [{"role": "assistant", "content": "good"}],
        f"non_preferred_{spelling}": [{"role": "assistant", "content": "bad"}],
    }
    report = validate_jsonl([json.dumps(example).encode()])
    assert (report.format, report.counts) == ("preference", {})


def test_preference_problems() -> None:
    two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    cases = [
        {"input": {"messages": []}, "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]},
        {"input": {"messages": [USER]}, "preferred_output": two, "non_preferred_output": [ASSISTANT]},
        {"input": {"messages": [USER]}, "preferred_output": [ASSISTANT], "non_preferred_output": [USER]},
    ]
    report = validate_jsonl([json.dumps(e).encode() for e in cases])
    assert [(p.key, p.line, p.field) for p in report.problems] == [
        ("missing_messages_list", 1, "input.messages"),
        ("invalid_preference_output", 2, "preferred_output"),
        ("invalid_preference_output", 3, "non_preferred_output[0].role"),
    ]


def test_tokens_are_counted_and_long_examples_reported() -> None:
    lines = [
        json.dumps(msgs(USER, {"role": "assistant", "content": "x" * n})).encode() for n in (1, 50, 3, 80)
    ]
    report = validate_jsonl(lines, count_tokens=lambda e: len(e["messages"][1]["content"]), max_tokens=40)
    assert (report.n_tokens, report.too_long, report.too_long_lines) == (134, 2, [2, 4])
    assert report.ok(min_examples=4)
    assert report.job_error(param="training_file", min_examples=4) is None
    error = report.job_error(param="training_file", min_examples=4, strict_length=True)
    assert error is not None and error["code"] == "example_too_long" and "lines 2, 4" in error["message"]
    assert validate_jsonl(lines).n_tokens is None


def job_error(report: Report, param: str = "training_file", min_examples: int = 10) -> dict:
    error = report.job_error(param=param, min_examples=min_examples)
    assert error is not None
    return error


def test_job_errors_follow_openai_codes() -> None:
    few = validate_jsonl([GOOD_LINE] * 3)
    assert job_error(few) == {
        "code": "invalid_n_examples",
        "param": "training_file",
        "message": "Training file has 3 example(s), but must have at least 10 examples",
    }
    assert job_error(validate_jsonl([])) ["code"] == "invalid_n_examples"  # fmt: skip
    not_json = validate_jsonl([GOOD_LINE, b"nope", b"\xff"])
    error = job_error(not_json)
    assert error["code"] == "invalid_file_format" and "line 2" in error["message"]
    schema = validate_jsonl([GOOD_LINE] * 11 + [b'{"messages": [{"role": "user", "content": "q"}]}'])
    error = job_error(schema)
    assert error["code"] == "invalid_training_file" and "line 12" in error["message"]
    error = job_error(schema, param="validation_file")
    assert (error["code"], error["param"]) == ("invalid_validation_file", "validation_file")
    assert error["message"].startswith("Validation file")
    assert validate_jsonl([GOOD_LINE] * 10).job_error(param="training_file", min_examples=10) is None


def test_reads_a_file_object_line_by_line() -> None:
    buffer = io.BytesIO(b"".join(GOOD_LINE + b"\n" for _ in range(1000)))
    report = validate_jsonl(buffer)
    assert report.n_examples == 1000 and report.summary() == "1000 example(s) in chat format"


def test_huge_lines_are_cut_while_reading_and_reported() -> None:
    data = GOOD_LINE + b"\n" + b'{"messages": "' + b"x" * 5000 + b'"}\n' + GOOD_LINE + b"\n" + b"y" * 3000
    lines = list(read_lines(io.BytesIO(data), max_line_bytes=1000))
    assert [len(line) for line in lines] == [len(GOOD_LINE) + 1, 1001, len(GOOD_LINE) + 1, 1001]
    report = validate_jsonl(lines, max_line_bytes=1000)
    assert [(p.key, p.line) for p in report.problems] == [("line_too_long", 2), ("line_too_long", 4)]
    error = report.job_error(param="training_file", min_examples=1)
    assert error is not None and error["code"] == "invalid_file_format"
    assert list(read_lines(io.BytesIO(b"a\nb"), max_line_bytes=10)) == [b"a\n", b"b"]


# --- lines that once raised instead of being reported -------------------------------------------------------
ODD_LINES = [
    # bad line, key, field
    (msgs({"role": ["user"], "content": "Q"}, ASSISTANT), "unrecognized_role", "messages[0].role"),
    (msgs({"role": {"a": 1}, "content": "Q"}, ASSISTANT), "unrecognized_role", "messages[0].role"),
    (b"[" * 200000, "invalid_json", None),
    (b"[" * 200000 + b"]" * 200000, "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "Q", "weight": ' + b"7" * 6000 + b"}]}", "invalid_number",
     "messages[0].weight"),
    (b'{"x": [1, -' + b"7" * 6000 + b"]}", "invalid_number", "x[1]"),
    (b"9" * 6000, "invalid_number", None),
    (msgs(USER, {**ASSISTANT, "weight": [1]}), "invalid_weight", "messages[1].weight"),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": NaN}]}',
     "invalid_json", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "key", "field"), ODD_LINES, ids=[f"{c[1]}-{i}" for i, c in enumerate(ODD_LINES)]
)
def test_odd_lines_are_problems_naming_line_and_field(bad: object, key: str, field: str | None) -> None:
    report = validate_jsonl(lines_with(bad, at=2, total=3))
    assert [(p.key, p.line, p.field) for p in report.problems] == [(key, 2, field)]
    assert len(report.summary()) < 300  # a user's value is quoted short, whatever its size


# --- properties: whatever the bytes, the outcome is a report ------------------------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT.filter(bool)})
ANSWER = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": TEXT.filter(bool)}, optional={"weight": st.sampled_from([0, 1])}
)
CHAT = st.builds(
    lambda before, answer: {"messages": [*before, answer]}, st.lists(MESSAGE, max_size=3), ANSWER
)
COMPLETION = st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT.filter(bool)})
PREFERENCE = st.builds(
    lambda messages, good, bad: {"input": {"messages": messages}, "preferred_output": [good],
                                 "non_preferred_output": [bad]},
    st.lists(MESSAGE, min_size=1, max_size=3), ANSWER, ANSWER,
)  # fmt: skip
VALID = st.one_of(CHAT, COMPLETION, PREFERENCE)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A valid example with one value somewhere inside replaced by any JSON value, or one key dropped or added."""
    example = draw(VALID)
    node = draw(st.sampled_from(_containers(example)))
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = draw(st.sampled_from(["replace", "drop", "add"] if keys else ["add"]))
    if action == "add":
        if isinstance(node, dict):
            node[draw(TEXT)] = draw(JSON)
        else:
            node.append(draw(JSON))
    elif action == "drop":
        del node[draw(st.sampled_from(keys))]
    else:
        node[draw(st.sampled_from(keys))] = draw(JSON)
    return example


def _containers(value: Any) -> list[Any]:
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list)):
            found.append(item)
            stack += list(item.values() if isinstance(item, dict) else item)
    return found


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


LINE = st.one_of(
    VALID.map(encode),
    mutated().map(encode),
    JSON.map(encode),
    st.binary(max_size=60),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.integers(4000, 5000).map(lambda n: b'{"prompt": "a", "completion": ' + b"1" * n + b"}"),
)


def assert_reported(report: Report, lines: list[bytes]) -> None:
    assert isinstance(report, Report)
    for problem in report.problems:
        assert 1 <= problem.line <= len(lines)
        assert problem.describe().startswith(f"line {problem.line}")
    assert isinstance(report.summary(), str)
    if report.counts:
        assert report.summary().startswith(f"line {report.problems[0].line}")
        assert report.job_error(param="training_file", min_examples=1) is not None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, min_size=1, max_size=8))
def test_any_lines_give_a_report_never_an_exception(lines: list[bytes]) -> None:
    report = validate_jsonl(lines)
    assert_reported(report, lines)
    first = lines[0].removeprefix(b"\xef\xbb\xbf")  # a byte order mark on the first line is not content
    assert report.n_examples == sum(1 for line in [first, *lines[1:]] if line.strip())


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(CHAT, min_size=1, max_size=5), st.lists(COMPLETION, min_size=1, max_size=5),
                 st.lists(PREFERENCE, min_size=1, max_size=5)))  # fmt: skip
def test_valid_files_of_one_format_pass(examples: list[dict]) -> None:
    report = validate_jsonl([encode(e) + b"\n" for e in examples])
    assert report.counts == {}, report.problems
    assert report.n_examples == len(examples) and report.ok(min_examples=len(examples))
