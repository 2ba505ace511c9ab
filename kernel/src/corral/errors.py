"""One error hierarchy for corral: every error has a CDP/1 code, a reason and a retry flag.

Codes follow the HTTP families so they read naturally (4xx: the request is wrong and retrying
the same request cannot help; 5xx: the kernel or a driver failed, a retry may help).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Numeric error codes carried in CDP/1 ERROR bodies."""

    BAD_FRAME = 400  # not a CDP/1 message: wrong frame count, signature or command
    UNAUTHENTICATED = 401  # peer not admitted (uid / key) or no HELLO yet
    FORBIDDEN = 403  # the operation is not in the table of the peer's role
    UNKNOWN_OPERATION = 404  # no such operation, or the target driver does not offer it
    CONFLICT = 409  # a resource is held by someone else
    TOO_LARGE = 413  # body over the size limit
    INVALID = 422  # body is not valid JSON or does not match the operation's schema
    VERSION = 426  # no common protocol version
    INTERNAL = 500  # a bug: the handler raised
    UNAVAILABLE = 503  # the driver needed is not connected (retry may help)
    TIMEOUT = 504  # the driver did not answer in time (retry may help)


_RETRYABLE = {ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT}


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        reason: str,
        *,
        code: ErrorCode | None = None,
        retry: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code
        self.retry = (self.code in _RETRYABLE) if retry is None else retry
        self.details = details or {}

    def __str__(self) -> str:
        return self.reason


class ManifestError(CorralError):
    """A manifest (or override) is invalid. ``problems`` lists each one, already located."""

    code = ErrorCode.INVALID

    def __init__(self, problems: list[str], *, file: str | None = None) -> None:
        self.problems = problems
        self.file = file
        super().__init__("\n".join(problems), details={"problems": problems, "file": file})


class DriverUnavailableError(CorralError):
    """A driver the operation needs is enabled but not connected (starting, restarting,
    failed). Nothing was done; ``details`` name the driver, its state and its reason."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, reason: str, *, driver: str, state: str, driver_reason: str) -> None:
        super().__init__(reason, details={"driver": driver, "state": state,
                                          "driver_reason": driver_reason})
        self.driver = driver


class ConflictError(CorralError):
    """A claim hit a resource that someone else holds."""

    code = ErrorCode.CONFLICT

    def __init__(
        self, reason: str, *, kind: str, key: str, holder: str, since: str | None = None
    ) -> None:
        super().__init__(
            reason, details={"kind": kind, "key": key, "holder": holder, "since": since}
        )
        self.kind = kind
        self.key = key
        self.holder = holder
        self.since = since


class NotFoundError(CorralError):
    """The named app, instance, job or resource does not exist."""

    code = ErrorCode.UNKNOWN_OPERATION


class ProtocolError(CorralError):
    """A peer broke CDP/1 (bad frames, bad body, wrong command at this point of the dialog)."""

    code = ErrorCode.BAD_FRAME


class UnavailableError(CorralError):
    """A needed driver is not connected or did not answer."""

    code = ErrorCode.UNAVAILABLE


class LaunchError(CorralError):
    """An instance could not be launched; ``step`` names the step that failed."""

    code = ErrorCode.INTERNAL

    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(f"{step}: {reason}", retry=False, details={"step": step})
        self.step = step
