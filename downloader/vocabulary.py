"""The service's one vocabulary: job states, callback states, file states, event types and the
outcomes a processor or notifier records. Python and the Lua scripts spell these the same way;
tests/test_contract.py checks the scripts against this module."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CallbackOutcome",
    "CallbackState",
    "DownloadOutcome",
    "DownloadState",
    "EventType",
    "FileState",
]


class DownloadState(StrEnum):
    """`download_state` of a job (the original's state names)."""

    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    SUCCESS = "Success"
    FAILED = "Failed"

    @property
    def ended(self) -> bool:
        return self in (DownloadState.SUCCESS, DownloadState.FAILED)


class CallbackState(StrEnum):
    """`callback_state` of a job; NOT_REQUESTED: submitted with a bucket and no callback."""

    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    SUCCESS = "Success"
    FAILED = "Failed"
    NOT_REQUESTED = "NotRequested"


class FileState(StrEnum):
    """`file_state`: where the downloaded file is."""

    NONE = "none"
    STORED = "stored"  # in the file store, until the reaper deletes it
    DELETED = "deleted"
    S3 = "s3"  # in the job's own bucket, never deleted by us


class EventType(StrEnum):
    """Every event a job can have, named in the past tense."""

    JOB_ACCEPTED = "job.accepted"
    DOWNLOAD_STARTED = "download.started"
    DOWNLOAD_REQUEUED = "download.requeued"
    DOWNLOAD_RETRY_SCHEDULED = "download.retry_scheduled"
    DOWNLOAD_SUCCEEDED = "download.succeeded"
    DOWNLOAD_FAILED = "download.failed"
    JOB_ABORTED = "job.aborted"
    CALLBACK_ATTEMPTED = "callback.attempted"
    CALLBACK_RETRY_SCHEDULED = "callback.retry_scheduled"
    CALLBACK_DELIVERED = "callback.delivered"
    CALLBACK_FAILED = "callback.failed"
    CALLBACK_REQUEUED = "callback.requeued"
    FILE_DELETED = "file.deleted"


class DownloadOutcome(StrEnum):
    """What a processor records for one download attempt (finish.lua's `outcome`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"


class CallbackOutcome(StrEnum):
    """What a notifier records for one callback attempt (callback_end.lua's `outcome`)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
