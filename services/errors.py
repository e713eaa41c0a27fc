"""Domain errors of the control plane. Raised anywhere; turned into gRPC status codes in one place
(services/interceptors.py). This module imports no grpc, so the store and validation stay pure."""

from __future__ import annotations


class StillroomError(Exception):
    """Base class. `code` names a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidArgument(StillroomError):
    """One or more field violations: [(field path, description)], e.g.
    ("stages[1].grpo.group_size", "must be >= 2")."""

    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[tuple[str, str]] | str):
        if isinstance(violations, str):
            violations = [("", violations)]
        self.violations = list(violations)
        super().__init__("; ".join(f"{f}: {d}" if f else d for f, d in self.violations))


class NotFound(StillroomError):
    """No such job (or not this tenant's: a tenant never learns of another's jobs)."""

    code = "NOT_FOUND"


class AlreadyExists(StillroomError):
    """A request_id already used with a different spec."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(StillroomError):
    """The job's state forbids the call, e.g. cancelling a finished job."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(StillroomError):
    """A read-only token, a path outside the data roots, a reward module not allowed."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(StillroomError):
    """A tenant's queue quota, or a message over the size limit."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(StillroomError):
    """No token, or one the server does not know."""

    code = "UNAUTHENTICATED"


class Unavailable(StillroomError):
    """The store is busy or the server is shutting down: retry."""

    code = "UNAVAILABLE"
