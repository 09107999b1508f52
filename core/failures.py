"""One type for every way a job fails: OpenAI's `{code, message, param}` error, raised and stored alike."""

from __future__ import annotations

from typing import Any


class JobFailure(Exception):
    """The job fails (or its request is refused) with this OpenAI error.

    `code` is OpenAI's machine-readable string (`invalid_training_file`, `invalid_n_examples`,
    `unsupported_model`, `too_many_attempts`, ...), `param` the field or file it is about.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def as_error(self) -> dict[str, Any]:
        """The `error` object stored on the job row and shown by the API."""
        return {"code": self.code, "message": self.message, "param": self.param}

    @classmethod
    def from_error(cls, error: dict[str, Any]) -> JobFailure:
        return cls(
            str(error.get("code") or "internal_error"), str(error.get("message", "")), error.get("param")
        )
