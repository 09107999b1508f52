"""Templates of grader inputs: `{{ item.field }}`, `{{ sample.output_text }}`, `{{ sample.output_json.key }}`.

A path is dotted keys (and list indexes: `item.choices.0`), looked up in the `item` and `sample` namespaces only.
A string is substituted as is, anything else as compact JSON. A missing field is a `TemplateError` naming it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from core.graders.errors import TemplateError, TemplateTooLong
from core.graders.spec import MAX_TEMPLATE_CHARS

_VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
NAMESPACES = ("item", "sample")


def sample_namespace(model_sample: str) -> dict[str, Any]:
    """The `sample` namespace of one model output: `output_text`, `output_json` (when the text is a JSON object),
    `output_tools` and `choices` (shaped as Chat Completions')."""
    try:
        parsed = json.loads(model_sample)
    except ValueError:
        parsed = None
    message = {"role": "assistant", "content": model_sample}
    return {
        "output_text": model_sample,
        "output_json": parsed if isinstance(parsed, dict) else None,
        "output_tools": [],
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
    }


def render(template: str, *, sample: dict[str, Any], item: Any) -> str:
    """`template` with every `{{ namespace.path }}` replaced.

    Args:
        template: the grader's `input`, `reference` or message text.
        sample: from `sample_namespace`.
        item: the dataset line (any JSON).

    Returns:
        The text, at most `MAX_TEMPLATE_CHARS` characters.

    Raises:
        TemplateError: an unknown namespace or a missing field (its `param` is the path, e.g. `item.answer`).
        TemplateTooLong: the result is longer than the limit.
    """
    scope = {"item": item, "sample": sample}
    text = _VARIABLE.sub(lambda match: _text(_lookup(match.group(1), scope)), template)
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateTooLong(f"A rendered template is longer than {MAX_TEMPLATE_CHARS} characters.")
    return text


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    namespace, _, rest = path.partition(".")
    if namespace not in NAMESPACES:
        raise TemplateError(f"Template variable '{{{{ {path} }}}}' must start with 'item.' or 'sample.'.",
                            param=path or None)  # fmt: skip
    value, walked = scope[namespace], namespace
    for key in rest.split(".") if rest else []:
        walked = f"{walked}.{key}"
        value = _child(value, key, walked)
    return value


def _child(value: Any, key: str, walked: str) -> Any:
    if isinstance(value, dict) and key in value:
        return value[key]
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
        return value[int(key)]
    if walked == "sample.output_json" or walked.startswith("sample.output_json."):
        hint = " (the model sample is not a JSON object)" if value is None else ""
        raise TemplateError(f"The sample has no field '{walked}'{hint}.", param=walked)
    raise TemplateError(f"The {walked.split('.')[0]} has no field '{walked}'.", param=walked)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
