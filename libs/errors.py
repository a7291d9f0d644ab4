"""The one error hierarchy of Mission Control.

Adapters (psycopg, nats, chDB, HTTP) translate their own exceptions into these at the boundary, so
domain code and handlers never import driver exceptions. ``TransientError`` is the only family that
is retried.
"""

from __future__ import annotations

# libpq quotes the whole connection string back when it cannot parse it (a URL without its
# scheme, say), password included: such a message is never repeated.
_CONNINFO_ERRORS = ("connection info string", "invalid connection option", "invalid dsn")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when it has none), safe to log and show.

    A database driver's complaint about a connection string is replaced by a message that does
    not quote the string, since it may hold a password.
    """
    text = str(exc).strip()
    if any(marker in text for marker in _CONNINFO_ERRORS):
        return "invalid database URL (not repeated here: it may hold a password)"
    return text.splitlines()[0] if text else type(exc).__name__


class MissionControlError(Exception):
    """Base class of every error the project raises on purpose."""

    code = "internal"
    http_status = 500


class TransientError(MissionControlError):
    """A failure that may succeed when tried again (connection lost, timeout, server restarting)."""

    code = "unavailable"
    http_status = 503


class PermanentError(MissionControlError):
    """A failure that will fail again the same way: retrying only wastes deliveries."""

    code = "permanent"
    http_status = 422


class InvalidInput(PermanentError):
    """The caller sent something malformed or out of range."""

    code = "invalid_input"
    http_status = 422


class NotFound(PermanentError):
    """The thing named does not exist (or is not visible to this tenant)."""

    code = "not_found"
    http_status = 404


class Conflict(PermanentError):
    """The request contradicts the current state (for example a step on a stopped run)."""

    code = "conflict"
    http_status = 409


class Unauthorized(PermanentError):
    """No valid credentials were presented."""

    code = "unauthorized"
    http_status = 401


class Forbidden(PermanentError):
    """The caller is authenticated but may not do this (a role or a key scope it lacks)."""

    code = "forbidden"
    http_status = 403


class ConcurrencyError(Conflict):
    """An append found the stream at another version than the caller expected."""

    code = "concurrency_conflict"

    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, caller expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class UnknownEventType(PermanentError):
    """No model is registered for an event's (type, version)."""

    code = "unknown_event_type"


class TooLarge(PermanentError):
    """A request or an answer is larger than the system carries."""

    code = "too_large"
    http_status = 413


class Overloaded(TransientError):
    """The service is at its bound of work in flight and refused the request at once.

    Answered instead of queueing, so a caller learns within a round trip that it should back off
    (HTTP 429 with ``Retry-After``) rather than after seconds in a queue.
    """

    code = "overloaded"
    http_status = 429


class DeadlineExceeded(TransientError):
    """A request did not get its answer before its deadline."""

    code = "deadline_exceeded"
    http_status = 504
