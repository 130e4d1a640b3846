"""The one error tree: transient errors are retried, permanent ones never are."""

from __future__ import annotations

__all__ = [
    "BlockedAddressError",
    "ConfigError",
    "DownloaderError",
    "PermanentError",
    "StorageUnavailable",
    "TransientError",
    "ValidationFailed",
]


class DownloaderError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DownloaderError, ValueError):
    """The configuration is invalid; the message names the key."""


class TransientError(DownloaderError):
    """A failure worth retrying: connection errors, timeouts, 5xx, truncated bodies."""

    def __init__(self, message: str, response_code: int = 0) -> None:
        super().__init__(message)
        self.response_code = response_code


class PermanentError(DownloaderError):
    """A failure that retrying cannot fix: 4xx, TLS, mime mismatch, bad image, too large."""

    def __init__(self, message: str, response_code: int = 0) -> None:
        super().__init__(message)
        self.response_code = response_code


class BlockedAddressError(PermanentError, OSError):
    """A connection to a non-public address was refused by the network policy."""


class ValidationFailed(DownloaderError, ValueError):
    """Client input is invalid: `field` names what, `status` is the HTTP status to answer."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class StorageUnavailable(DownloaderError, ConnectionError):
    """Redis cannot be reached right now."""
