"""Errors as OpenAI sends them: a status and ``{"error": {"message", "type", "param", "code"}}``,
so an OpenAI SDK raises its matching class."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from api_tasks.errors import ApiTasksError

__all__ = ["GatewayError", "job_error_status", "openai_error"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}
# a job that ended without an HTTP status of its own: the status its error code means
_CODE_STATUS = {"cancelled": 409, "timeout": 504, "connect_error": 502, "connection_error": 502,
                "invalid_job": 400, "stream_truncated": 502, "invalid_json": 502,
                "invalid_chunk": 502, "response_too_large": 502, "stream_too_large": 502}


class GatewayError(ApiTasksError):
    """A request refused with an OpenAI-shaped error; nothing was enqueued."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "api_error")
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The error as a response."""
        return openai_error(self.status, self.message, type=self.type, param=self.param,
                            code=self.code, headers=self.headers)


def openai_error(status: int, message: str, *, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape (all four keys present)."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def job_error_status(error: dict[str, Any]) -> int:
    """The HTTP status a failed or cancelled job's error object answers with."""
    status = error.get("status")
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    return _CODE_STATUS.get(str(error.get("code")), 500)


def job_error(error: dict[str, Any]) -> JSONResponse:
    """A job's stored error object as the response of a synchronous call."""
    status = job_error_status(error)
    headers = {"x-should-retry": "false"} if status == 409 else None
    return openai_error(status, str(error.get("message") or "the job failed"),
                        type=str(error.get("type") or _TYPES.get(status, "server_error")),
                        param=error.get("param"), code=error.get("code"), headers=headers)
