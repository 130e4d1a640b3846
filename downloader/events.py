"""Every job event type, named in the past tense; the fold that applies them is in
scripts/prelude.lua (`fold`), so the live projection and a rebuild run the same code.

Events are stored in Redis Streams as the fields `type`, `ts` (ms since the epoch, UTC), `v`
(schema version) and `data` (JSON). The stream entry id is the event id."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from downloader.vocabulary import EventType

__all__ = [
    "EVENT_TYPES",
    "CallbackAttempted",
    "CallbackDelivered",
    "CallbackFailed",
    "CallbackRequeued",
    "CallbackRetryScheduled",
    "DownloadFailed",
    "DownloadRequeued",
    "DownloadRetryScheduled",
    "DownloadStarted",
    "DownloadSucceeded",
    "FileDeleted",
    "JobAborted",
    "JobAccepted",
    "JobEvent",
    "parse_event",
]


class JobEvent(BaseModel):
    """Common fields of every event; subclasses add the data fields."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: ClassVar[str] = ""  # an EventType; "" only for a type this version does not know
    v: int = 1
    id: str = ""
    job_id: str = ""
    ts: datetime | None = None

    def data(self) -> dict[str, Any]:
        """The event's data: what the fold reads."""
        return self.model_dump(exclude={"v", "id", "job_id", "ts"})

    def as_json(self) -> dict[str, Any]:
        """The public shape (GET /jobs/{id}/events, the Kafka export)."""
        return {
            "id": self.id,
            "type": self.type,
            "ts": self.ts.isoformat().replace("+00:00", "Z") if self.ts else None,
            "job_id": self.job_id,
            "v": self.v,
            "data": self.data(),
        }


class JobAccepted(JobEvent):
    type: ClassVar[str] = EventType.JOB_ACCEPTED


class DownloadStarted(JobEvent):
    type: ClassVar[str] = EventType.DOWNLOAD_STARTED
    attempt: int


class DownloadRequeued(JobEvent):
    """A processor died (its lease expired) or shut down holding the job."""

    type: ClassVar[str] = EventType.DOWNLOAD_REQUEUED
    attempt: int
    reason: str


class DownloadRetryScheduled(JobEvent):
    type: ClassVar[str] = EventType.DOWNLOAD_RETRY_SCHEDULED
    attempt: int
    response_code: int
    error: str
    retry_in_ms: int


class DownloadSucceeded(JobEvent):
    type: ClassVar[str] = EventType.DOWNLOAD_SUCCEEDED
    attempt: int
    response_code: int
    download_url: str
    file_mime_type: str
    file_bytes: int
    image_size: str
    s3_bucket: str = ""
    s3_key: str = ""
    """Where the file went when the job named a bucket (download_url is then s3://bucket/key)."""

    def data(self) -> dict[str, Any]:
        """As stored: the S3 fields only on an upload to S3."""
        out = super().data()
        if not self.s3_key:
            out.pop("s3_bucket", None)
            out.pop("s3_key", None)
        return out


class DownloadFailed(JobEvent):
    type: ClassVar[str] = EventType.DOWNLOAD_FAILED
    attempt: int
    response_code: int
    error: str
    file_mime_type: str = ""


class JobAborted(JobEvent):
    """DELETE /jobs/{id}: the download was cancelled; a failure callback follows."""

    type: ClassVar[str] = EventType.JOB_ABORTED
    reason: str


class CallbackAttempted(JobEvent):
    type: ClassVar[str] = EventType.CALLBACK_ATTEMPTED
    attempt: int


class CallbackRetryScheduled(JobEvent):
    type: ClassVar[str] = EventType.CALLBACK_RETRY_SCHEDULED
    attempt: int
    delivery_error: str
    retry_in_ms: int


class CallbackDelivered(JobEvent):
    type: ClassVar[str] = EventType.CALLBACK_DELIVERED
    attempt: int


class CallbackFailed(JobEvent):
    type: ClassVar[str] = EventType.CALLBACK_FAILED
    attempt: int
    delivery_error: str


class CallbackRequeued(JobEvent):
    """POST /retry/{id}: a fresh round of callback attempts."""

    type: ClassVar[str] = EventType.CALLBACK_REQUEUED


class FileDeleted(JobEvent):
    type: ClassVar[str] = EventType.FILE_DELETED


EVENT_TYPES: dict[str, type[JobEvent]] = {  # tests/test_contract.py: one class per EventType
    cls.type: cls
    for cls in (
        JobAccepted,
        DownloadStarted,
        DownloadRequeued,
        DownloadRetryScheduled,
        DownloadSucceeded,
        DownloadFailed,
        JobAborted,
        CallbackAttempted,
        CallbackRetryScheduled,
        CallbackDelivered,
        CallbackFailed,
        CallbackRequeued,
        FileDeleted,
    )
}


@functools.cache
def _unknown(etype: str) -> type[JobEvent]:
    """The class of an event type this version does not know (written by a newer one): its
    data is kept as it is, and its type name shown."""
    return type("UnknownEvent", (JobEvent,), {"type": etype})


def parse_event(event_id: str, fields: dict[str, str], job_id: str = "") -> JobEvent:
    """A stream entry as an event object; unknown types (from a newer version) keep their data."""
    cls = EVENT_TYPES.get(fields["type"]) or _unknown(fields["type"])
    ts = datetime.fromtimestamp(int(fields["ts"]) / 1000, tz=UTC)
    data = json.loads(fields.get("data") or "{}")
    event = cls.model_validate(
        {
            **data,
            "v": int(fields.get("v", 1)),
            "id": event_id,
            "job_id": fields.get("job_id", job_id),
            "ts": ts,
        }
    )
    return event
