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
    code = "NOT_FOUND"


class AlreadyExists(StillroomError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(StillroomError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(StillroomError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(StillroomError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(StillroomError):
    code = "UNAUTHENTICATED"


class Unavailable(StillroomError):
    code = "UNAVAILABLE"
