"""Domain errors of the service, each carrying the gRPC status it maps to.

Code anywhere in moefleet raises these; the one place that turns them into gRPC statuses
is the servicers' `ErrorInterceptor` (router/servicer.py). This module imports no grpc,
so the maths and the control plane can raise them freely.
"""

from __future__ import annotations

__all__ = [
    "MoefleetError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Unauthenticated",
]


class MoefleetError(Exception):
    """Base class; `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(MoefleetError):
    code = "INVALID_ARGUMENT"


class NotFound(MoefleetError):
    code = "NOT_FOUND"


class ResourceExhausted(MoefleetError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(MoefleetError):
    """Draining, not ready, or a host failed with no other replica: safe to retry."""

    code = "UNAVAILABLE"


class DeadlineExceeded(MoefleetError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(MoefleetError):
    code = "UNAUTHENTICATED"
