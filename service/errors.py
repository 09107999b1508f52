"""The one exception hierarchy of the API, rendered as OpenAI's nested error envelope by `app.py`.

Raise these anywhere in the service; never match on message text. `param` names the offending field
(dotted path for nested fields) and `code` is a stable machine-readable string.
"""

from __future__ import annotations

from typing import Any

from service.protocol import ErrorInfo, ErrorResponse


def envelope(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body `{"error": {"message", "type", "param", "code"}}`: the only place it is built."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    """400: a bad field, a bad file, or a state change the job cannot make (never 409: the SDK retries 409)."""

    status_code = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(APIError):
    """404: unknown, deleted, or another project's object (indistinguishable on purpose)."""

    status_code = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "file_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"


class ServiceUnavailable(APIError):
    """503 with `retry-after`: a dependency (Redis, vLLM) is not reachable right now."""

    status_code = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("retry-after", str(retry_after))


_DESCRIPTIONS = {
    400: "Invalid request: a bad field, query parameter, body or state change (`param` names it)",
    401: "Missing, unknown or revoked API key",
    403: "Not allowed (a base model cannot be deleted)",
    404: "No such object in this project",
    413: "Request body or file too large",
    429: "Rate limit or quota reached; `retry-after` says when to try again",
}
GUARDED = (400, 401, 413, 429)  # what any `/v1` request may get from the guard middleware, before its route


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries of these error statuses, each the error envelope (for routes and routers)."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def not_found(kind: str, object_id: str, *, param: str = "id") -> NotFound:
    """OpenAI's wording: `No such File object: file-…`."""
    return NotFound(f"No such {kind} object: {object_id}", param=param)
