"""What can go wrong with a grader: a bad definition (`GraderError`, a 400 naming the field) and the per-sample
error flags OpenAI reports in `metadata.errors` (`GradeErrors`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


class GraderError(ValueError):
    """A grader definition (or a request around it) that cannot be run; `param` is the dotted field path.

    The API renders it as a 400 `invalid_request_error` with this `param`; the runner refuses the job with it.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TemplateError(GraderError):
    """A `{{ namespace.path }}` that names a missing field (`param` is the field, e.g. `item.answer`)."""


class TemplateTooLong(GraderError):
    """A rendered template longer than the limit: the sample's `truncated_observation_error`."""


@dataclass
class GradeErrors:
    """OpenAI's `metadata.errors` flags, all false when the sample was graded; a flagged sample's reward is 0."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False

    @property
    def any(self) -> bool:
        return any(value is True for value in asdict(self).values())

    def merge(self, other: GradeErrors) -> None:
        """Set every flag (and detail) that `other` has set: a multi grader reports its sub-graders' errors."""
        for key, value in asdict(other).items():
            if value:
                setattr(self, key, value)

    def to_dict(self) -> dict[str, bool | str | None]:
        return asdict(self)
