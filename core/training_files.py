"""Streaming validation of JSONL training files (chat, prompt/completion, preference).

Pure: no database, no storage, no tokenizer of its own. The API runs it at upload (without a tokenizer) to set a
file's `status`; the worker runs it again in `validating_files` with the base model's tokenizer to count tokens
and fail the job with OpenAI's error codes. Lines are read one at a time, so a file is never held in memory.

Problem keys are those of OpenAI's data-preparation cookbook (`data_type`, `missing_messages_list`,
`message_missing_key`, `message_unrecognized_key`, `unrecognized_role`, `missing_content`,
`example_missing_assistant_message`) plus our own for what the cookbook does not check (encoding, JSON syntax,
mixed formats, weights, prompt/completion and preference shapes, tools).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

CHAT, COMPLETION, PREFERENCE = "chat", "completion", "preference"
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id"})
ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})
PREFERRED_KEYS = ("preferred_output", "preferred_completion")
NON_PREFERRED_KEYS = ("non_preferred_output", "non_preferred_completion")
_PREFERENCE_MARKS = frozenset(
    {"input", *PREFERRED_KEYS, *NON_PREFERRED_KEYS}
)  # any of these: a preference example
PROBLEMS_PER_KEY = 5  # problems kept per key (counts cover every line)
MAX_INT_DIGITS = 4300  # Python refuses to convert longer integers (`sys.get_int_max_str_digits()` default)
SHOWN_CHARS = 40  # a user's value quoted in a problem message is cut to this many characters

# Keys that mean the file is not JSONL at all (job error `invalid_file_format`); every other key is a schema
# problem (`invalid_training_file` / `invalid_validation_file`).
FORMAT_KEYS = frozenset({"invalid_encoding", "invalid_json", "line_too_long"})


@dataclass
class Problem:
    """One problem on one line. `line` is 1-based and counts blank lines; `field` is a path such as
    `messages[2].role`, or None when the whole line is at fault."""

    key: str
    line: int
    field: str | None
    message: str

    def describe(self) -> str:
        where = f"line {self.line}" + (f", {self.field}" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class Report:
    """What `validate_jsonl` found in a file."""

    format: str | None = None  # "chat" | "completion" | "preference"; the format of the first example
    n_examples: int = 0  # non-blank lines
    counts: dict[str, int] = field(default_factory=dict)  # problem key -> number of lines with it
    problems: list[Problem] = field(default_factory=list)  # the first few of each key, in line order
    n_tokens: int | None = None  # sum of tokens per example (when a token counter was given)
    too_long: int = 0  # examples over `max_tokens`
    too_long_lines: list[int] = field(default_factory=list)  # the first few of them

    def ok(self, min_examples: int) -> bool:
        """True when no line has a problem and there are at least `min_examples` examples."""
        return not self.counts and self.n_examples >= min_examples

    def summary(self) -> str:
        """Human text naming the first offending line and the count of each problem key."""
        if not self.counts:
            text = f"{self.n_examples} example(s) in {self.format or 'no'} format"
            if self.too_long:
                text += f"; {self.too_long} example(s) longer than the limit will be truncated"
            return text
        first = self.problems[0].describe()
        counts = ", ".join(f"{key}: {n} line(s)" for key, n in sorted(self.counts.items()))
        return f"{first} ({counts})"

    def job_error(self, *, param: str, min_examples: int, strict_length: bool = False) -> dict | None:
        """The `error` object a job fails with because of this file, or None when the file is usable.

        Args:
            param: `training_file` or `validation_file`; it names the file in the message and in the code.
            min_examples: fewest examples the file must have.
            strict_length: fail with `example_too_long` instead of truncating long examples.

        Returns:
            `{"code", "message", "param"}` or None.
        """
        label = "Training" if param == "training_file" else "Validation"
        if any(key in FORMAT_KEYS for key in self.counts):
            first = next(p for p in self.problems if p.key in FORMAT_KEYS)
            message = f"{label} file is not valid JSONL: {first.describe()} ({self._counts_text()})"
            return {"code": "invalid_file_format", "message": message, "param": param}
        if self.counts:
            code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
            return {
                "code": code,
                "message": f"{label} file has invalid examples: {self.summary()}",
                "param": param,
            }
        if self.n_examples < min_examples:
            message = f"{label} file has {self.n_examples} example(s), but must have at least {min_examples} examples"
            return {"code": "invalid_n_examples", "message": message, "param": param}
        if strict_length and self.too_long:
            lines = ", ".join(str(n) for n in self.too_long_lines)
            message = f"{label} file has {self.too_long} example(s) over the token limit (lines {lines})"
            return {"code": "example_too_long", "message": message, "param": param}
        return None

    def _counts_text(self) -> str:
        return ", ".join(f"{key}: {n} line(s)" for key, n in sorted(self.counts.items()))

    def _add(self, problems: list[Problem]) -> None:
        for key in dict.fromkeys(p.key for p in problems):
            self.counts[key] = self.counts.get(key, 0) + 1
        for problem in problems:
            if sum(1 for p in self.problems if p.key == problem.key) < PROBLEMS_PER_KEY:
                self.problems.append(problem)


def validate_jsonl(
    lines: Iterable[bytes],
    *,
    count_tokens: Callable[[dict], int] | None = None,
    max_tokens: int | None = None,
    max_line_bytes: int | None = None,
) -> Report:
    """Check a JSONL training file line by line.

    Args:
        lines: the file's lines as bytes (a binary file object works), with or without line endings.
        count_tokens: tokens of one valid example; enables `n_tokens` and the `max_tokens` check.
        max_tokens: examples with more tokens are counted in `too_long`.
        max_line_bytes: longer lines are a `line_too_long` problem (`read_lines` cuts them to one byte more).

    Returns:
        The report: format, example count, problems by key with line numbers, token totals.
    """
    report = Report(n_tokens=0 if count_tokens else None)
    for number, raw in enumerate(lines, start=1):
        data = raw.rstrip(b"\r\n")
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # UTF-8 byte order mark
        if not data.strip():
            continue
        report.n_examples += 1
        if max_line_bytes is not None and len(data) > max_line_bytes:
            report._add(
                [Problem("line_too_long", number, None, f"the line is longer than {max_line_bytes} bytes")]
            )
            continue
        example, problems = _parse(data, number)
        if example is not None:
            problems = _check_example(example, number, report)
        if problems:
            report._add(problems)
        if example is not None and not problems and count_tokens is not None:
            _count(report, example, number, count_tokens, max_tokens)
    return report


def read_lines(handle: BinaryIO, *, max_line_bytes: int) -> Iterator[bytes]:
    """The lines of a binary file, each cut to `max_line_bytes + 1` bytes so that one huge line is never held
    in memory (pass the same `max_line_bytes` to `validate_jsonl`, which then reports it)."""
    while line := handle.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := handle.readline(max_line_bytes + 1)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the long line
        yield line


def _count(
    report: Report, example: dict, line: int, count_tokens: Callable[[dict], int], max_tokens: int | None
) -> None:
    tokens = count_tokens(example)
    report.n_tokens = (report.n_tokens or 0) + tokens
    if max_tokens is not None and tokens > max_tokens:
        report.too_long += 1
        if len(report.too_long_lines) < PROBLEMS_PER_KEY:
            report.too_long_lines.append(line)


def _parse(data: bytes, line: int) -> tuple[dict | None, list[Problem]]:
    """The line's JSON object, or the problem that stops it from being one. Strict JSON: `NaN` and `Infinity`
    are refused; nesting deeper than Python's parser can follow and integers Python cannot convert are problems
    of the line, never exceptions.

    orjson parses a valid line (strict RFC 8259 JSON, UTF-8 checked) several times faster than `json`; whatever
    it refuses (bad JSON or encoding, but also integers past 64 bits and nesting past 1024 levels, which `json`
    may accept) goes through `json` with its hooks, which accepts or names the problem exactly as before.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _parse_exactly(data, line)
    if not isinstance(value, dict):
        return None, [Problem("data_type", line, None, f"expected a JSON object, got {_kind(value)}")]
    return value, []


def _parse_exactly(data: bytes, line: int) -> tuple[dict | None, list[Problem]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem("invalid_encoding", line, None, f"not valid UTF-8 (byte {exc.start + 1})")]
    huge: list[_HugeInt] = []
    try:
        value = json.loads(
            text, parse_int=lambda digits: _parse_int(digits, huge), parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as exc:
        return None, [
            Problem("invalid_json", line, None, f"not valid JSON ({exc.msg} at column {exc.colno})")
        ]
    except (
        ValueError,
        RecursionError,
    ) as exc:  # `_refuse_constant`, or nesting deeper than the parser's stack
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        return None, [Problem("invalid_json", line, None, f"not valid JSON ({reason})")]
    if huge:
        text = f"an integer with more than {MAX_INT_DIGITS} digits"
        return None, [Problem("invalid_number", line, _path_of_huge_int(value) or None, text)]
    if not isinstance(value, dict):
        return None, [Problem("data_type", line, None, f"expected a JSON object, got {_kind(value)}")]
    return value, []


class _HugeInt:
    """Stands in for an integer literal too long to convert, so that its field can be named."""


def _parse_int(digits: str, huge: list[_HugeInt]) -> int | _HugeInt:
    if len(digits) <= MAX_INT_DIGITS:
        return int(digits)
    huge.append(_HugeInt())
    return huge[-1]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _path_of_huge_int(value: Any) -> str:
    """The field path of the first `_HugeInt` in `value` ("" for the value itself).
    Iterative, because `value` may be nested as deeply as the parser allows."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _HugeInt):
            return path
        if isinstance(item, dict):
            stack += [(f"{path}.{k}" if path else k, v) for k, v in reversed(item.items())]
        elif isinstance(item, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item)))]
    return ""


def detect_format(example: dict) -> str:
    """The format one example is written in (chat when nothing else fits, as the cookbook assumes)."""
    if not _PREFERENCE_MARKS.isdisjoint(example):
        return PREFERENCE
    if "messages" not in example and ("prompt" in example or "completion" in example):
        return COMPLETION
    return CHAT


def _check_example(example: dict, line: int, report: Report) -> list[Problem]:
    kind = detect_format(example)
    if report.format is None:
        report.format = kind
    elif kind != report.format:
        message = f"example is in {kind} format but the file's first example is in {report.format} format"
        return [Problem("mixed_formats", line, None, message)]
    if kind == COMPLETION:
        return _check_completion(example, line)
    if kind == PREFERENCE:
        return _check_preference(example, line)
    return _check_chat(example, line)


def _check_chat(example: dict, line: int) -> list[Problem]:
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return [Problem("missing_messages_list", line, "messages", "`messages` must be a non-empty list")]
    problems = _check_messages(messages, line, "messages")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(
            Problem(
                "example_missing_assistant_message", line, "messages", "the example has no assistant message"
            )
        )
    problems += _check_tools(example, line, "tools")
    return problems


def _check_messages(messages: list, line: int, path: str) -> list[Problem]:
    problems: list[Problem] = []
    for index, message in enumerate(messages):
        if (
            type(message) is dict and len(message) == 2
        ):  # the common `{"role": ..., "content": "..."}`, at once
            role, content = message.get("role"), message.get("content")
            if type(role) is str and role in ROLES and type(content) is str and content:
                continue
        where = f"{path}[{index}]"
        if not isinstance(message, dict):
            problems.append(
                Problem("data_type", line, where, f"a message must be an object, got {_kind(message)}")
            )
            continue
        problems += _check_message(message, line, where)
    return problems


def _check_message(message: dict, line: int, where: str) -> list[Problem]:
    content = message.get("content")
    if len(message) == 2 and _is_role(message.get("role")) and isinstance(content, str) and content:
        return []  # the common case, `{"role": ..., "content": "..."}`, without the checks below
    problems: list[Problem] = []
    has_call = bool(message.get("function_call") or message.get("tool_calls"))
    for key in ("role", "content"):
        if key not in message and not (key == "content" and has_call):
            problems.append(
                Problem("message_missing_key", line, f"{where}.{key}", f"the message has no `{key}`")
            )
    unknown = sorted(k for k in message if k not in MESSAGE_KEYS)
    if unknown:
        names = ", ".join(f"`{_cut(k)}`" for k in unknown[:PROBLEMS_PER_KEY])
        problems.append(
            Problem("message_unrecognized_key", line, f"{where}.{_cut(unknown[0])}", f"unrecognized {names}")
        )
    role = message.get("role")
    if "role" in message and not _is_role(role):
        problems.append(
            Problem("unrecognized_role", line, f"{where}.role", f"unrecognized role {_show(role)}")
        )
    if "content" in message and not has_call and not _valid_content(message["content"]):
        text = "`content` must be a non-empty string"
        problems.append(Problem("missing_content", line, f"{where}.content", text))
    if "weight" in message:
        problems += _check_weight(message, line, where)
    return problems


def _check_weight(message: dict, line: int, where: str) -> list[Problem]:
    weight = message["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        return [
            Problem(
                "invalid_weight", line, f"{where}.weight", f"`weight` must be 0 or 1, got {_show(weight)}"
            )
        ]
    if message.get("role") != "assistant":
        return [
            Problem(
                "invalid_weight", line, f"{where}.weight", "`weight` is allowed on assistant messages only"
            )
        ]
    return []


def _valid_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content)
    if isinstance(content, list) and content:  # content parts: [{"type": "text", "text": "..."}]
        return all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        )
    return False


def _check_tools(example: dict, line: int, path: str) -> list[Problem]:
    tools = example.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [Problem("invalid_tools", line, path, "`tools` must be a list")]
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            text = 'a tool must be {"type": "function", "function": {"name": ...}}'
            return [Problem("invalid_tools", line, f"{path}[{index}]", text)]
    return []


def _check_completion(example: dict, line: int) -> list[Problem]:
    problems: list[Problem] = []
    for key in ("prompt", "completion"):
        if not isinstance(example.get(key), str):
            text = f"`{key}` must be a string, got {_kind(example.get(key))}"
            problems.append(Problem("invalid_prompt_completion", line, key, text))
    if not problems and not example["completion"]:
        problems.append(Problem("missing_content", line, "completion", "`completion` must not be empty"))
    return problems


def _check_preference(example: dict, line: int) -> list[Problem]:
    source = example.get("input")
    messages = source.get("messages") if isinstance(source, dict) else None
    if not isinstance(messages, list) or not messages:
        return [
            Problem(
                "missing_messages_list", line, "input.messages", "`input.messages` must be a non-empty list"
            )
        ]
    problems = _check_messages(messages, line, "input.messages")
    problems += _check_tools(source, line, "input.tools")  # type: ignore[arg-type]
    for keys in (PREFERRED_KEYS, NON_PREFERRED_KEYS):
        problems += _check_preference_side(example, keys, line)
    return problems


def _check_preference_side(example: dict, keys: tuple[str, str], line: int) -> list[Problem]:
    key = next((k for k in keys if k in example), keys[0])
    side = example.get(key)
    if not isinstance(side, list) or len(side) != 1 or not isinstance(side[0], dict):
        text = f"`{key}` must be a list of exactly one assistant message"
        return [Problem("invalid_preference_output", line, key, text)]
    problems = _check_message(side[0], line, f"{key}[0]")
    if side[0].get("role") != "assistant":
        problems.append(
            Problem("invalid_preference_output", line, f"{key}[0].role", "the role must be `assistant`")
        )
    return problems


def _is_role(value: Any) -> bool:
    return isinstance(value, str) and value in ROLES  # type first: a list or an object cannot be hashed


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def _show(value: Any) -> str:
    """A user's value for a message: short strings and numbers as written, anything else by its kind."""
    if isinstance(value, str):
        return repr(_cut(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _cut(repr(value))
    return _kind(value)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
