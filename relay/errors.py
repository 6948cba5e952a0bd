"""Every exception the relay raises on purpose derives from RelayError."""

from __future__ import annotations


class RelayError(Exception):
    """Root of all progress-relay errors."""


class ConfigError(RelayError):
    """A configuration key is unknown or has an invalid value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class EmitError(RelayError):
    """An emit operation was refused; nothing was changed."""


class BadArgument(EmitError, ValueError):
    """An emit argument is invalid (negative number, unknown status, empty id...)."""


class WrongUser(EmitError):
    """The batch exists and belongs to another user."""


class BadEntry(RelayError):
    """A stream entry or batch hash that cannot be turned into a BatchState."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AuthFailed(RelayError):
    """A token or an auth message was refused. `code` is the WebSocket close code."""

    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # short label for metrics and logs


class JwksError(RelayError):
    """A JWKS endpoint could not be read, or its answer holds no usable key."""


def error_fields(e: BaseException) -> dict[str, str]:
    """Log fields for an exception: its type and its message. redis-py 8's `repr` of a
    connection error drops the reason (`network:ConnectionError`); `str` keeps it, e.g. the
    certificate problem of a failed TLS handshake."""
    return {"error_type": type(e).__name__, "error": str(e)}


def describe(e: BaseException) -> str:
    """One line for an exception: `Type: message`."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
