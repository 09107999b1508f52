"""Grader definitions as OpenAI sends them (`openai.types.graders.*`), parsed and bounded in one place.

`parse_grader(obj)` turns the JSON of `grader` into one of the models below or raises `GraderError` naming the
field (`grader.operation`, `grader.graders.name.input`...). It also checks what a type alone cannot: a
`label_model` only inside a `multi`, no `multi` inside a `multi`, the formula's names, and the limits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.graders.errors import GraderError

MAX_SUB_GRADERS = 16  # graders of one `multi`
MAX_TEMPLATE_CHARS = 64 * 1024  # any `input` / `reference` template, and any rendered text
MAX_MESSAGES = 32  # input messages of a model grader
MAX_SOURCE_CHARS = 256 * 1024  # a python grader's source (OpenAI's documented limit: 256 kB)
MAX_FORMULA_CHARS = 1024
MAX_LABELS = 64
MAX_NAME_CHARS = 256
MAX_COMPLETION_TOKENS = 4096  # a judge's `sampling_params.max_completions_tokens`

Text = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class _Grader(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    name: Name
    input: Text
    reference: Text
    operation: Literal["eq", "ne", "like", "ilike"]


Metric = Literal[
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
]  # fmt: skip


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    name: Name
    input: Text
    reference: Text
    evaluation_metric: Metric


class PythonGrader(_Grader):
    type: Literal["python"]
    name: Name
    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]
    image_tag: str | None = None  # accepted and ignored: one interpreter, this service's own


class InputText(_Grader):
    type: Literal["input_text", "output_text"]
    text: Text


class Message(_Grader):
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | InputText | list[InputText]
    type: Literal["message"] | None = None


class SamplingParams(_Grader):
    max_completions_tokens: Annotated[int, Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    reasoning_effort: str | None = None  # accepted; no model served here reasons
    seed: int | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    name: Name
    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    input: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    range: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    sampling_params: SamplingParams | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.range or (0.0, 1.0)
        return low, high


class LabelModelGrader(_Grader):
    type: Literal["label_model"]
    name: Name
    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    input: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    labels: Annotated[list[Name], Field(min_length=1, max_length=MAX_LABELS)]
    passing_labels: Annotated[list[Name], Field(min_length=1, max_length=MAX_LABELS)]


SubGrader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader


class MultiGrader(_Grader):
    type: Literal["multi"]
    name: Name
    graders: dict[str, SubGrader]
    calculate_output: Annotated[str, Field(min_length=1, max_length=MAX_FORMULA_CHARS)]


Grader = SubGrader | MultiGrader
_MODELS: dict[str, type[_Grader]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
    "python": PythonGrader,
    "score_model": ScoreModelGrader,
    "label_model": LabelModelGrader,
    "multi": MultiGrader,
}


def parse_grader(obj: Any, *, param: str = "grader") -> Grader:
    """The grader `obj` (OpenAI's JSON) as a model, checked.

    Args:
        obj: the `grader` object of a request or a job's method.
        param: the dotted path of `obj` in the request, the prefix of every error's `param`.

    Returns:
        The parsed grader.

    Raises:
        GraderError: a missing or bad field, an unknown type, a `label_model` at the top, a nested `multi`, a bad
            `calculate_output`, or a limit exceeded; `param` names the field.
    """
    if isinstance(obj, dict) and obj.get("type") == "label_model":
        raise GraderError(
            "A label_model grader is only allowed inside a multi grader.", param=f"{param}.type"
        )
    return _parse_one(obj, param=param, inside_multi=False)


def _parse_one(obj: Any, *, param: str, inside_multi: bool) -> Grader:
    if not isinstance(obj, dict):
        raise GraderError(f"Invalid value for '{param}': expected an object.", param=param)
    kind = obj.get("type")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None or (inside_multi and model is MultiGrader):
        allowed = [k for k in _MODELS if not (inside_multi and k == "multi")]
        raise GraderError(f"Invalid value for '{param}.type': {kind!r}; expected one of {allowed}.",
                          param=f"{param}.type")  # fmt: skip
    if model is MultiGrader:
        return _parse_multi(obj, param=param)
    return _validate(model, obj, param=param)  # type: ignore[return-value]


def _validate(model: type[_Grader], obj: dict[str, Any], *, param: str) -> _Grader:
    try:
        grader = model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([param, *(str(part) for part in first["loc"] if _is_field(part))])
        if first["type"] == "missing":
            raise GraderError(f"Missing required parameter: '{where}'.", param=where) from None
        raise GraderError(f"Invalid value for '{where}': {first['msg']}", param=where) from None
    if (
        isinstance(grader, ScoreModelGrader)
        and grader.range is not None
        and grader.bounds[0] >= grader.bounds[1]
    ):
        raise GraderError("'range' must be [low, high] with low < high.", param=f"{param}.range")
    if isinstance(grader, LabelModelGrader) and not set(grader.passing_labels) <= set(grader.labels):
        raise GraderError("'passing_labels' must be a subset of 'labels'.", param=f"{param}.passing_labels")
    return grader


def _is_field(part: str | int) -> bool:
    """A part of a pydantic error location that is a field or an index, not a union member's tag
    (`constrained-str`, `InputText`, `list[InputText]`)."""
    return isinstance(part, int) or (part not in ("str", "float", "int") and part.replace("_", "a").isalnum()
                                     and part.islower())  # fmt: skip


def _parse_multi(obj: dict[str, Any], *, param: str) -> MultiGrader:
    from core.graders.formula import parse_formula

    graders = obj.get("graders")
    if isinstance(graders, dict) and "type" in graders:  # the SDK's type: one grader, keyed by its own name
        graders = {str(graders.get("name", "grader")): graders}
    if not isinstance(graders, dict) or not graders:
        raise GraderError("'graders' must be a non-empty object of name -> grader.", param=f"{param}.graders")
    if len(graders) > MAX_SUB_GRADERS:
        raise GraderError(
            f"A multi grader may have at most {MAX_SUB_GRADERS} graders.", param=f"{param}.graders"
        )
    parsed = {}
    for key, sub in graders.items():
        if not key.isidentifier():
            raise GraderError(f"Grader key {key!r} must be a name usable in 'calculate_output'.",
                              param=f"{param}.graders.{key}")  # fmt: skip
        parsed[key] = _parse_one(sub, param=f"{param}.graders.{key}", inside_multi=True)
    multi = _validate(MultiGrader, {**obj, "graders": {}}, param=param)
    parse_formula(str(obj.get("calculate_output")), names=set(parsed), param=f"{param}.calculate_output")
    return MultiGrader.model_construct(**{**multi.__dict__, "graders": parsed})


def grader_json(grader: Grader) -> dict[str, Any]:
    """The grader as OpenAI's JSON (unset optional fields left out), for `/validate` and job records."""
    if isinstance(grader, MultiGrader):
        body = grader.model_dump(exclude={"graders"}, exclude_none=True)
        return {**body, "graders": {key: grader_json(sub) for key, sub in grader.graders.items()}}
    return grader.model_dump(exclude_none=True)
