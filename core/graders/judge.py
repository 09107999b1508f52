"""The contract between model graders and whoever calls the judge model (the API's gateway, later the runner).

A `score_model` or `label_model` grader renders its messages and asks a `Judge` for one chat completion with a
JSON-schema `response_format`; the judge's reply is parsed here, so that every caller reads it the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JudgeRequest:
    """One chat completion for a model grader."""

    model: str  # a model served here: a base model id or an `ft:` name of the caller's project
    messages: list[dict[str, str]]
    sampling: dict[str, Any]  # chat-completion fields: max_completion_tokens, temperature, top_p, seed
    response_format: dict[str, Any]


@dataclass
class JudgeReply:
    """The judge's answer: its text (or refusal) and token usage."""

    text: str | None
    refusal: str | None = None
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens


class JudgeUnavailable(Exception):
    """The judge could not answer (its server is down or failed): `model_grader_server_error`."""


Judge = Callable[[JudgeRequest], JudgeReply]


def score_format() -> dict[str, Any]:
    """The `response_format` of a score_model judge: `{"steps": [...], "result": number}`."""
    schema = {
        "type": "object",
        "properties": {"steps": {"type": "array", "items": {"type": "string"}}, "result": {"type": "number"}},
        "required": ["result"],
    }
    return {"type": "json_schema", "json_schema": {"name": "score", "schema": schema}}


def label_format(labels: list[str]) -> dict[str, Any]:
    """The `response_format` of a label_model judge: `{"result": one of labels}`."""
    schema = {
        "type": "object",
        "properties": {"result": {"type": "string", "enum": labels}},
        "required": ["result"],
    }
    return {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}


def parse_score(text: str) -> float | None:
    """The number of a judge's `{"result": x}` (or a bare number), None when there is none."""
    value = _result(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label of a judge's `{"result": "label"}` (or the bare label), None when it is none of `labels`."""
    value = _result(text)
    if value is None and text.strip() in labels:
        value = text.strip()
    return value if isinstance(value, str) and value in labels else None


def _result(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value.get("result") if isinstance(value, dict) else value
