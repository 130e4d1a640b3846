"""The one error tree: transient errors are retried, permanent ones never are."""

from __future__ import annotations

__all__ = [
    "BlockedAddressError",
    "CallbackNotFailed",
    "ConfigError",
    "Conflict",
    "DownloadEnded",
    "DownloaderError",
    "Forbidden",
    "IdempotencyConflict",
    "JobNotFound",
    "NoCallback",
    "PermanentError",
    "ProxyConflict",
    "RateLimited",
    "RequestRefused",
    "StorageUnavailable",
    "TooManyAggregations",
    "TooManyRequests",
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


class StorageUnavailable(DownloaderError, ConnectionError):
    """Redis cannot be reached right now (or a write could not be confirmed on a replica):
    storage raises this, and only this, for an outage."""


class RequestRefused(DownloaderError):
    """A request the service will not carry out: `status` is the HTTP answer (4xx), `field`
    names what the caller got wrong. The API turns each into one JSON error, in one place."""

    status = 400

    def __init__(self, field: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        if status is not None:
            self.status = status


class ValidationFailed(RequestRefused, ValueError):
    """Client input is invalid."""


class Forbidden(RequestRefused):
    """The token may not do this (its role): a `read` token submitting, a tenant asking for
    service-wide figures."""

    status = 403

    def __init__(self, message: str) -> None:
        super().__init__("Authorization", message)


class JobNotFound(RequestRefused, LookupError):
    """No job with this id (never was, or expired after its retention)."""

    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__("job_id", f"no job {job_id!r}")
        self.job_id = job_id


class Conflict(RequestRefused):
    """The request is valid but the job or aggregation is not in a state that allows it."""

    status = 409


class ProxyConflict(Conflict):
    """The aggregation has unfinished jobs and another proxy (shown without its password)."""

    def __init__(self, aggr_id: str, shown_proxy: str) -> None:
        super().__init__(
            "aggr_proxy",
            f"aggr_proxy differs from the proxy of the existing aggregation {aggr_id!r} "
            f"({shown_proxy or 'none'}); it is fixed while the aggregation has jobs",
        )


class IdempotencyConflict(RequestRefused):
    """The Idempotency-Key was used for another request."""

    status = 422

    def __init__(self, job_id: str) -> None:
        super().__init__(
            "Idempotency-Key",
            f"Idempotency-Key was already used for job {job_id} with a different request",
        )
        self.job_id = job_id


class TooManyRequests(RequestRefused):
    """A quota of the caller's is used up for now; `retry_after_s` says when to try again."""

    status = 429

    def __init__(self, field: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(field, message)
        self.retry_after_s = retry_after_s


class RateLimited(TooManyRequests):
    """The token's request rate (api.tokens rate_per_second) is used up for now."""

    def __init__(self, retry_after_ms: int, rate: float) -> None:
        super().__init__(
            "Authorization",
            f"this token may make {rate:g} requests per second; retry in {retry_after_ms} ms",
            retry_after_ms / 1000,
        )


class TooManyAggregations(TooManyRequests):
    """The caller has as many aggregations with unfinished jobs as it may (a new one is
    refused until one of them drains)."""

    def __init__(self, cap: int) -> None:
        super().__init__(
            "aggr_id",
            f"aggr_id: this caller already has {cap} aggregations with unfinished jobs "
            "(api.max_aggregations_per_tenant); use one of them or wait until one drains",
            5.0,
        )


class DownloadEnded(Conflict):
    """An abort came after the download reached its outcome."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__("job_id", f"the download of job {job_id} already ended ({state})")


class CallbackNotFailed(Conflict):
    """A /retry of a callback that has not failed."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__("job_id", f"the callback of job {job_id} has not failed (it is {state})")


class NoCallback(Conflict):
    """A /retry of a job submitted without a callback."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            "job_id",
            f"job {job_id} has no callback to retry (it was submitted with s3_bucket and "
            "no callback)",
        )
