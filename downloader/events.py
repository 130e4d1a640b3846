"""Every job event type, named in the past tense; the fold that applies them is in
scripts/prelude.lua (`fold`), so the live projection and a rebuild run the same code.

An event is stored twice: in its shard's stream (the feed of the export: fields `j` job id, `t`
type, `d` data JSON) and in its job's own list (a line `<id>\t<type>\t<data JSON>`). Its id is
the id of the stream entry, `<ms since the epoch>-<seq>`, which is also its time."""

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
    "parse_line",
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


def _event(event_id: str, etype: str, job_id: str, data_json: str) -> JobEvent:
    """An event object; an unknown type (from a newer version) keeps its data. Its time is its
    id's: an event id is the id of its entry in its shard's stream, `<ms>-<seq>`."""
    cls = EVENT_TYPES.get(etype) or _unknown(etype)
    ts = datetime.fromtimestamp(int(event_id.split("-", 1)[0]) / 1000, tz=UTC)
    data = json.loads(data_json or "{}")
    return cls.model_validate({**data, "id": event_id, "job_id": job_id, "ts": ts})


def parse_event(event_id: str, fields: dict[str, str]) -> JobEvent:
    """An entry of a shard's event stream (fields `j` job id, `t` type, `d` data)."""
    return _event(event_id, fields["t"], fields["j"], fields.get("d", ""))


PACKED_TYPE_CODES: dict[str, str] = {
    EventType.JOB_ACCEPTED: "a",
    EventType.DOWNLOAD_STARTED: "s",
    EventType.DOWNLOAD_REQUEUED: "q",
    EventType.DOWNLOAD_RETRY_SCHEDULED: "r",
    EventType.DOWNLOAD_SUCCEEDED: "S",
    EventType.DOWNLOAD_FAILED: "F",
    EventType.JOB_ABORTED: "x",
    EventType.CALLBACK_ATTEMPTED: "c",
    EventType.CALLBACK_RETRY_SCHEDULED: "R",
    EventType.CALLBACK_DELIVERED: "C",
    EventType.CALLBACK_FAILED: "E",
    EventType.CALLBACK_REQUEUED: "Q",
    EventType.FILE_DELETED: "d",
}
"""An event type's code in a packed job (prelude.lua's TYPE_CODE, its twin)."""
_TYPE_OF_CODE = {code: str(etype) for etype, code in PACKED_TYPE_CODES.items()}


def unpack_lines(packed: str) -> list[str]:
    """The event lines of a packed job (`done:<id>`) as they were live: its first line (the
    sealed fields) dropped, every type code spelled out, every `+<ms>[-<seq>]` id made whole
    again (prelude.lua's pack_line writes them; lines packed before are whole already)."""
    out: list[str] = []
    ms = 0
    for line in packed.split("\n")[1:]:
        event_id, code, data = line.split("\t", 2)
        if event_id.startswith("+"):
            delta, _, seq = event_id[1:].partition("-")
            ms += int(delta)
            event_id = f"{ms}-{seq or 0}"
        else:
            ms = int(event_id.split("-", 1)[0])
        out.append(f"{event_id}\t{_TYPE_OF_CODE.get(code, code)}\t{data}")
    return out


def parse_line(line: str, job_id: str) -> JobEvent:
    """A line of a job's own events (`<id>\t<type>\t<data JSON>`)."""
    event_id, etype, data_json = line.split("\t", 2)
    return _event(event_id, etype, job_id, data_json)
