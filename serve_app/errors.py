"""One exception type for every client-visible failure, rendered as OpenAI's error JSON.

Deployments raise :class:`ServeAppError`; the ingress turns it into
``{"error": {"message", "type", "code", "param"}}`` with ``status``. It is a plain
exception (no Ray imports) so engine and preprocessing code can raise it too, and it
pickles cleanly across Ray calls.
"""

from __future__ import annotations

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class ServeAppError(Exception):
    """A failure with an HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        self.retry_after_s = retry_after_s   # sent as a Retry-After header when set

    def __reduce__(self):  # keep all fields across pickling (Ray task errors)
        return (ServeAppError, (self.message, self.status, self.code, self.param, self.type,
                                self.retry_after_s))

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def __repr__(self) -> str:
        return f"ServeAppError({self.status}, {self.code!r}, {self.message!r})"
