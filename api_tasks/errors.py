"""The project's one exception tree, and the OpenAI-style error object.

Every failure a user can see is an ``ApiTasksError`` (bad settings raise
``config.errors.ConfigError``, from the layer below). Failures of a job carry
an error object, the JSON dict stored in the job's result and error event::

    {"type": "rate_limit_error", "code": "rate_limit_exceeded", "status": 429,
     "message": "...", "param": null, "attempts": 3, "upstream": "openai"}

This module imports nothing else of the project, so every module may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ApiTasksError",
    "BatchNotFound",
    "BrokerUnavailable",
    "CallCancelled",
    "InvalidBatch",
    "InvalidJob",
    "InvalidResponseError",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobTimeout",
    "RequestTooLarge",
    "StreamError",
    "StreamRestarted",
    "UnknownModel",
    "UpstreamError",
    "UrlRefused",
    "WorkerStopping",
    "error_object",
]

ErrorObject = dict[str, Any]
_MAX_MESSAGE = 2000


def error_object(
    type: str,
    code: str,
    message: str,
    status: int | None = None,
    param: str | None = None,
    **extra: Any,
) -> ErrorObject:
    """Build an OpenAI-style error object; messages are capped so a huge page can't bloat it."""
    body: ErrorObject = {
        "type": type,
        "code": code,
        "message": message[:_MAX_MESSAGE],
        "status": status,
        "param": param,
    }
    body.update(extra)
    return body


class ApiTasksError(Exception):
    """Root of every exception this project raises."""


class InvalidJob(ApiTasksError, ValueError):
    """A job was refused because one of its fields is invalid."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def to_error(self) -> ErrorObject:
        """The error object a worker stores when such a job reaches it."""
        return error_object("invalid_request_error", "invalid_job", str(self), 400, self.param)


class UnknownModel(InvalidJob):
    """No configured upstream serves the job's model."""

    def __init__(self, model: str) -> None:
        super().__init__("model", f"no configured upstream serves model {model!r}")


class InvalidBatch(InvalidJob):
    """A batch file was refused: ``problems`` lists every bad line, nothing was sent."""

    def __init__(self, path: str, problems: list[str]) -> None:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        super().__init__("input", f"{path}: {len(problems)} invalid line(s): {shown}")
        self.problems = problems


class JobNotFound(ApiTasksError, LookupError):
    """No job with that id exists (it never did, or it expired)."""


class BatchNotFound(JobNotFound):
    """No batch with that id exists (it never did, or it expired)."""


class BrokerUnavailable(ApiTasksError, ConnectionError):
    """Redis could not be reached, so nothing was submitted or read."""


class JobTimeout(ApiTasksError, TimeoutError):
    """The job did not finish within the time the caller waited."""


class JobFailed(ApiTasksError):
    """The job ended failed; ``.error`` is its error object."""

    def __init__(self, job_id: str, error: ErrorObject) -> None:
        super().__init__(f"job {job_id} failed: {error.get('code')}: {error.get('message')}")
        self.job_id = job_id
        self.error = error


class JobCancelled(JobFailed):
    """The job was cancelled before it finished."""


class StreamRestarted(ApiTasksError):
    """The job began a new attempt after this reader showed chunks of an earlier one."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id} restarted as attempt {attempt}: discard what was shown "
                         "and call stream() again")
        self.job_id = job_id
        self.attempt = attempt


class WorkerStopping(ApiTasksError):
    """The worker is shutting down mid-call: the job goes back to its queue."""


class UpstreamError(ApiTasksError):
    """A call to the upstream failed; ``error`` says how, ``retryable`` whether to try again."""

    retryable = False
    type = "api_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.code
        self.type = type or self.type
        self.param = param
        self.retry_after = retry_after

    def to_error(self, **extra: Any) -> ErrorObject:
        """This failure as an error object."""
        return error_object(self.type, self.code, self.message, self.status, self.param, **extra)


class APIStatusError(UpstreamError):
    """The upstream answered with an HTTP error status (``headers``: its answer's headers)."""

    headers: Mapping[str, str] = {}

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        if self.code == "insufficient_quota":
            return False  # a 429 that waiting will not cure: the account is out of credit
        return self.status in (408, 409, 429) or (self.status or 0) >= 500


class APITimeoutError(UpstreamError):
    """The upstream did not answer in time (connect, read, or the whole-call deadline)."""

    retryable = True
    type = "timeout_error"
    code = "timeout"


class APIConnectionError(UpstreamError):
    """The upstream could not be reached, or dropped the connection."""

    retryable = True
    type = "api_connection_error"
    code = "connection_error"


class InvalidResponseError(UpstreamError):
    """The upstream answered with something that is not a valid OpenAI-format response."""

    type = "invalid_response_error"
    code = "invalid_response"


class StreamError(UpstreamError):
    """The upstream reported an error inside a 200 event stream, or cut the stream short."""

    type = "server_error"
    code = "stream_error"


class RequestTooLarge(UpstreamError):
    """The call needs more tokens than its upstream's per-minute limit allows at all."""

    type = "invalid_request_error"
    code = "request_too_large"


class UrlRefused(UpstreamError):
    """A job's chosen host resolved to an address its allow-list does not name."""

    type = "invalid_request_error"
    code = "base_url_refused"


class CallCancelled(UpstreamError):
    """The call was stopped because its job was cancelled."""

    type = "cancelled"
    code = "cancelled"
