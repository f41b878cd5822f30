"""Every error the server answers with, as exceptions carrying their HTTP status and OpenAI error fields.

Handlers raise them anywhere (routes, dependencies, the session manager); one exception handler turns them
into `{"error": {"message", "type", "param", "code"}}`, the shape OpenAI clients parse. A client mistake is
always one of these (4xx) with a message that says what to change; 5xx is left for our own bugs.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse


class ServerError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code:
            self.code = code


class BadRequest(ServerError):
    status, type, code = 400, "invalid_request_error", None


class Unauthorized(ServerError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class QuotaExceeded(ServerError):
    """A per-key or per-session allowance (sessions, disk) is used up: retrying will not help."""
    status, type, code = 403, "invalid_request_error", "quota_exceeded"


class NotFound(ServerError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Conflict(ServerError):
    status, type, code = 409, "invalid_request_error", "conflict"


class TooLarge(ServerError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedMediaType(ServerError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class Busy(ServerError):
    status, type, code = 429, "rate_limit_error", "server_busy"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServerError):
    status, type, code = 503, "server_error", "shutting_down"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(e: ServerError) -> dict:
    return error_body(e.message, e.type, e.param, e.code)


def error_response(e: ServerError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Busy) else None
    return JSONResponse(error_json(e), status_code=e.status, headers=headers)
