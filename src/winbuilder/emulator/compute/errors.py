"""The error shape of the Compute Engine API, as the emulator returns it.

Every failing call answers ``{"error": {"code", "message", "errors": [{"message", "domain", "reason"}],
"status"}}`` (the JSON error format of Google APIs, "Standard error responses" in the Compute docs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass(eq=False)
class ApiError(Exception):
    """An HTTP error answer of the emulated API.

    Args:
        code: HTTP status code (400, 404, 409, 412, 429, 503, ...).
        message: the human message, shaped like the real API's.
        reason: ``errors[0].reason`` (``invalid``, ``notFound``, ``alreadyExists``, ``conditionNotMet``,
            ``rateLimitExceeded``, ``backendError``, ``required``, ``badRequest``).
        domain: ``errors[0].domain`` (``global`` or ``usageLimits``).
        details: extra entries for ``error.details`` (e.g. ``google.rpc.BadRequest`` field violations).
        headers: extra response headers (e.g. ``WWW-Authenticate`` on 401).

    Not frozen: the interpreter and ``contextlib`` assign ``__traceback__`` on exceptions.
    """

    code: int
    message: str
    reason: str = "invalid"
    domain: str = "global"
    details: tuple[dict[str, Any], ...] = ()
    headers: tuple[tuple[str, str], ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"

    def body(self) -> dict[str, Any]:
        """Returns the JSON error document of this error."""
        err: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "errors": [{"message": self.message, "domain": self.domain, "reason": self.reason}],
            "status": _STATUS.get(self.code, "UNKNOWN"),
        }
        if self.details:
            err["details"] = list(self.details)
        return {"error": err}


def not_found(resource_path: str) -> ApiError:
    """The real API's 404 for a missing resource, e.g. ``projects/p/zones/z/instances/x``."""
    return ApiError(404, f"The resource '{resource_path}' was not found", "notFound")


def already_exists(resource_path: str) -> ApiError:
    """The real API's 409 for a name that is taken."""
    return ApiError(409, f"The resource '{resource_path}' already exists", "alreadyExists")


def invalid_field(field_path: str, value: object, why: str) -> ApiError:
    """The real API's 400 for a semantically invalid field value (``resource.name`` style paths)."""
    return ApiError(400, f"Invalid value for field '{field_path}': '{value}'. {why}", "invalid")
