"""Domain errors of the service, each carrying the gRPC status it maps to.

Code anywhere in moefleet raises these; the one place that turns them into gRPC statuses
is the servicers' `ErrorInterceptor` (router/server.py). This module imports no grpc,
so the maths and the control plane can raise them freely.

`HostGone` is the one exception here that is not a status: a host call raises it when the
host is gone for good, and the engine retries those rows on other replicas.
"""

from __future__ import annotations

__all__ = [
    "MoefleetError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Overloaded",
    "Unavailable",
    "DeadlineExceeded",
    "Unauthenticated",
    "PermissionDenied",
    "AlreadyExists",
    "FailedPrecondition",
    "HostGone",
    "quote",
    "message_of",
]

_QUOTE_CHARS = 200  # the most of any client-given string an error message repeats


class MoefleetError(Exception):
    """Base class; `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(MoefleetError):
    code = "INVALID_ARGUMENT"


class NotFound(MoefleetError):
    code = "NOT_FOUND"


class ResourceExhausted(MoefleetError):
    code = "RESOURCE_EXHAUSTED"


class Overloaded(ResourceExhausted):
    """Refused for now, under load: the same call may succeed after `retry_after_s`, which
    the status carries as gRPC's `grpc-retry-pushback-ms` trailer."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(MoefleetError):
    """Draining, not ready, or a host failed with no other replica: safe to retry."""

    code = "UNAVAILABLE"


class DeadlineExceeded(MoefleetError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(MoefleetError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MoefleetError):
    code = "PERMISSION_DENIED"


class AlreadyExists(MoefleetError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MoefleetError):
    """The request is valid but the state refuses it (e.g. removing a layer's last expert)."""

    code = "FAILED_PRECONDITION"


class HostGone(ConnectionError):
    """An expert host is gone for good (its actor died). Not a MoefleetError: the engine
    marks the host dead and retries its rows on other replicas, or raises Unavailable."""


def quote(value: object, limit: int = _QUOTE_CHARS) -> str:
    """repr() of a client-given value for an error message, cut to about `limit` characters,
    so that no message grows with what a client sent (gRPC caps a status's size)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def message_of(e: BaseException) -> str:
    """The domain message of an error, without what Ray wraps around it.

    An error raised inside a Ray actor reaches the caller as a class derived from both Ray's
    task error and the original one; its str() holds the remote traceback. Ray keeps the
    original in `.cause`. Only the original's own message belongs in a status or a CLI line."""
    seen = set()
    while getattr(e, "cause", None) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.cause
    return str(e)
