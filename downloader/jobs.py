"""Typed jobs at the storage boundary. Redis keeps a projection as a hash of strings; these
classes decode it once (ints, bools, JSON, states) so no caller parses strings again.

- `Job`: the whole projection (GET /jobs/{id}).
- `ClaimedJob`: what a processor needs to run one download, with the claim's lease token.
- `CallbackJob`: what a notifier needs to deliver one callback.

Each class names the projection fields it reads (`FIELDS`); the scripts return exactly those."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Self

from downloader.vocabulary import CallbackState, DownloadState, FileState

__all__ = ["CallbackJob", "ClaimedJob", "Job", "iso_ms"]

Decode = Callable[[str | None], Any]


def _decoder(tp: Any) -> Decode:
    """How a hash field of type `tp` is read back: Redis stores everything as a string."""
    if tp is int:
        return lambda v: int(v) if v else 0
    if tp is bool:
        return lambda v: v == "true"
    if typing.get_origin(tp) is dict:
        return lambda v: json.loads(v) if v else {}
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return tp
    return lambda v: v or ""


class _Row:
    """A frozen dataclass read from projection fields: its annotated fields, in order, but
    those named in NOT_STORED (set by the reader, e.g. a lease token)."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()
    NOT_STORED: ClassVar[tuple[str, ...]] = ()
    _DECODERS: ClassVar[tuple[Decode, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        hints = typing.get_type_hints(cls)
        names = [
            n
            for n, tp in hints.items()
            if typing.get_origin(tp) is not ClassVar and n not in cls.NOT_STORED
        ]
        cls.FIELDS = tuple(names)
        cls._DECODERS = tuple(_decoder(hints[n]) for n in names)

    @classmethod
    def from_values(cls, values: Sequence[str | None], *extra: Any) -> Self:
        """From HMGET values in FIELDS order (then any extra positional fields, e.g. a lease)."""
        decoded = [d(v) for d, v in zip(cls._DECODERS, values, strict=True)]
        return cls(*decoded, *extra)

    @classmethod
    def from_hash(cls, row: Mapping[str, str]) -> Self:
        """From a whole projection hash (HGETALL); fields it lacks read as empty."""
        return cls.from_values([row.get(name) for name in cls.FIELDS])


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (`2026-11-30T12:00:00.000Z`)."""
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Job(_Row):
    """A job's projection, every field typed."""

    id: str
    aggr_id: str
    aggr_limit: int
    aggr_proxy: str
    url: str
    callback_type: str
    callback_dst: str
    extra: str
    mime_type: str
    max_retries: int
    extract_image_size: bool
    download_timeout: int
    request_headers: dict[str, str]
    s3_bucket: str
    s3_region: str
    tenant: str
    download_state: DownloadState
    callback_state: CallbackState
    download_attempts: int
    callback_attempts: int
    response_code: int
    error: str
    delivery_error: str
    download_url: str
    file_mime_type: str
    file_bytes: int
    image_size: str
    file_state: FileState
    s3_key: str
    created_at: int
    updated_at: int
    last_event_id: str
    outcome_event_id: str

    def as_json(self) -> dict[str, Any]:
        """The public shape of GET /jobs/{id}: timestamps as ISO 8601 UTC."""
        out = dataclasses.asdict(self)
        out["created_at"] = iso_ms(self.created_at)
        out["updated_at"] = iso_ms(self.updated_at)
        return out


@dataclass(frozen=True, slots=True)
class ClaimedJob(_Row):
    """One download a processor holds: the job's settings and the claim's lease token (the
    fence: renew and finish succeed only while it is the job's current lease)."""

    NOT_STORED: ClassVar[tuple[str, ...]] = ("lease",)
    id: str
    aggr_id: str
    url: str
    request_headers: dict[str, str]
    download_timeout: int
    mime_type: str
    extract_image_size: bool
    download_attempts: int
    max_retries: int
    extra: str
    s3_bucket: str
    s3_region: str
    lease: str = field(default="")

    @property
    def attempt(self) -> int:
        """The attempt this claim is (download.started counted it)."""
        return self.download_attempts


@dataclass(frozen=True, slots=True)
class CallbackJob(_Row):
    """What one callback delivery needs."""

    id: str
    aggr_id: str
    download_state: DownloadState
    error: str
    extra: str
    url: str
    download_url: str
    response_code: int
    image_size: str
    callback_type: str
    callback_dst: str
    callback_attempts: int
    outcome_event_id: str
    tenant: str
