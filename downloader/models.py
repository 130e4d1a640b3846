"""Request and response models of the HTTP API, with every validation rule of POST /download."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import encode_basic_auth
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yarl import URL

from downloader.config import (
    REGION_MAX,
    Config,
    S3Config,
    is_bucket_name,
    is_kafka_topic,
    is_region_name,
    kafka_topic_refusal,
)
from downloader.errors import ValidationFailed
from downloader.headerpolicy import header_problem
from downloader.mime import MimePattern
from downloader.s3store import user_metadata

__all__ = [
    "INT32_MAX",
    "DownloadRequest",
    "check_kafka_topic",
    "check_s3_policy",
    "check_s3_region",
    "parse_download_request",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
INT32_MAX = 2**31 - 1
"""The largest aggr_limit or max_retries taken: what the original's clients can send it."""
# Optional strings that a client of the original may send empty to mean "not given"
_TWO_CREDENTIALS = (
    "request_headers: Authorization cannot be combined with credentials in url "
    "(user:password@): give one of them"
)
_EMPTY_MEANS_ABSENT = ("callback_type", "callback_dst", "callback_url", "s3_bucket", "s3_region")


def _check_http_url(value: str) -> str:
    """Raise ValueError ("must be ...") unless `value` is an absolute http(s) URL."""
    if len(value) > 8192:
        raise ValueError("must be at most 8192 characters long")
    if _CONTROL.search(value) or " " in value:
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"must be a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL")
    _check_host(parts.hostname)
    try:
        url = URL(value)  # as the HTTP client will read it
    except ValueError as exc:
        raise ValueError(f"must be a valid URL ({exc})") from exc
    _check_userinfo(url)
    return value


def _check_userinfo(url: URL) -> None:
    """Refuse credentials in a URL that the HTTP client cannot send as Basic credentials: a
    ':' in the user name (percent-encoded), or characters outside Latin-1."""
    if not has_userinfo(url):
        return
    try:
        encode_basic_auth(url.user or "", url.password or "", "latin-1")
    except UnicodeEncodeError:
        raise ValueError(
            "must have a user name and password in Latin-1 (HTTP Basic credentials)"
        ) from None
    except ValueError:
        raise ValueError("must not have a ':' in the user name (%3A)") from None


def has_userinfo(url: URL) -> bool:
    """Whether `url` carries credentials (`user@`, `user:password@`, `:password@`)."""
    return url.raw_user is not None or url.raw_password is not None


_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)\Z")


def _check_host(host: str) -> None:
    """Refuse a host that is not spelled canonically: a name of DNS labels, a bracketed IPv6
    address, or an IPv4 address as four decimal numbers. Browsers and resolvers read `127.1`,
    `2130706433` or `0x7f.1` as IPv4 addresses; a URL that means an address must say which."""
    if ":" in host:  # urlsplit's hostname of "[...]": an IPv6 literal
        try:
            if "%" in host:
                raise ValueError("a zone id")
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"must have a valid IPv6 address, not [{host}]") from None
        return
    try:
        ascii_host = host.encode("idna").decode("ascii")  # maps e.g. fullwidth digits to ASCII
    except UnicodeError:
        raise ValueError(f"must have a valid host name, not {host!r}") from None
    labels = ascii_host.removesuffix(".").split(".")
    if _NUMERIC.match(labels[-1]):  # read as an IPv4 address (WHATWG URL)
        try:
            if ascii_host != host:
                raise ValueError("not ASCII")
            ipaddress.IPv4Address(ascii_host)
        except ValueError:
            raise ValueError(
                f"must spell an IPv4 address as four decimal numbers, like 127.0.0.1, not {host!r}"
            ) from None
        return
    if len(ascii_host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"must have a valid host name, not {host!r}")


class DownloadRequest(BaseModel):
    """The body of POST /download. Types are strict: "10" is not an int, "yes" is not a bool."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    aggr_id: str = Field(min_length=1, max_length=256)
    aggr_limit: int = Field(gt=0, le=INT32_MAX)
    aggr_proxy: str | None = None
    url: str
    callback_type: Literal["http", "kafka"] | None = None
    callback_dst: str | None = None
    callback_url: str | None = None
    extra: str = ""
    mime_type: str = ""
    max_retries: int | None = Field(None, ge=0, le=INT32_MAX)
    extract_image_size: bool = False
    download_timeout: int | None = Field(None, ge=0, le=86_400)
    """0, as Go clients send an unset int, means the default."""
    request_headers: dict[str, str | int] = {}
    s3_bucket: str | None = None
    s3_region: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(k) == "" for k in _EMPTY_MEANS_ABSENT):
            return {k: v for k, v in data.items() if not (k in _EMPTY_MEANS_ABSENT and v == "")}
        return data

    @field_validator("aggr_id")
    @classmethod
    def _aggr_id(cls, v: str) -> str:
        if _CONTROL.search(v) or not v.strip():
            raise ValueError("must be a non-empty string without control characters")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_http_url(v)

    @field_validator("aggr_proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        assert v is not None
        return _check_http_url(v)

    @field_validator("mime_type")
    @classmethod
    def _mime(cls, v: str) -> str:
        if v.strip():
            MimePattern.parse(v)
        return v.strip()

    @field_validator("request_headers")
    @classmethod
    def _headers(cls, v: dict[str, str | int]) -> dict[str, str | int]:
        if len(v) > 100:
            raise ValueError("must have at most 100 headers")
        for name, value in v.items():  # the rules processor.request_headers follows too
            if problem := header_problem(name, str(value)):
                raise ValidationFailed("request_headers", f"request_headers: {problem}")
        return v

    @model_validator(mode="after")
    def _credentials_once(self) -> DownloadRequest:
        if has_userinfo(URL(self.url)) and any(
            k.lower() == "authorization" for k in self.request_headers
        ):
            raise ValidationFailed("request_headers", _TWO_CREDENTIALS)
        return self

    @model_validator(mode="after")
    def _callback_and_bucket(self) -> DownloadRequest:
        if self.callback_url is not None:
            if self.callback_type is not None or self.callback_dst is not None:
                raise ValidationFailed(
                    "callback_url",
                    "callback_url cannot be combined with callback_type/callback_dst",
                )
            _wrap("callback_url", self.callback_url)
        elif self.callback_type is not None or self.callback_dst is not None:
            if self.callback_type is None:
                raise ValidationFailed(
                    "callback_type", "callback_type is required with callback_dst"
                )
            if not self.callback_dst:
                raise ValidationFailed(
                    "callback_dst", "callback_dst is required with callback_type"
                )
            if self.callback_type == "http":
                _wrap("callback_dst", self.callback_dst)
            elif not is_kafka_topic(self.callback_dst):
                raise ValidationFailed(
                    "callback_dst",
                    "callback_dst must be a Kafka topic name ([A-Za-z0-9._-], 1-249)",
                )
        if (self.s3_bucket is None) != (self.s3_region is None):
            field = "s3_region" if self.s3_region is None else "s3_bucket"
            raise ValidationFailed(field, "s3_bucket and s3_region must be given together")
        if self.s3_bucket is not None and not is_bucket_name(self.s3_bucket):
            raise ValidationFailed(
                "s3_bucket",
                "s3_bucket must be a valid S3 bucket name: 3-63 characters, lowercase letters, "
                "digits, dots and hyphens, starting and ending with a letter or digit",
            )
        if self.s3_region is not None and not is_region_name(self.s3_region):
            raise ValidationFailed(
                "s3_region",
                f"s3_region must be a region name like eu-west-1 (lowercase letters, digits "
                f"and single hyphens, at most {REGION_MAX} characters)",
            )
        if self.s3_bucket is not None:
            try:  # the original's S3 user metadata; its keys and values become HTTP headers
                user_metadata(self.extra)
            except ValueError as exc:
                raise ValidationFailed(
                    "extra", f"extra cannot be the S3 object's user metadata: {exc}"
                ) from None
        if self.callback_kind is None and self.s3_bucket is None:
            raise ValidationFailed(
                "callback_url",
                "a callback is required unless s3_bucket is given: give callback_url or "
                "callback_type and callback_dst",
            )
        return self

    @property
    def callback_kind(self) -> str | None:
        return "http" if self.callback_url is not None else self.callback_type

    @property
    def callback_target(self) -> str:
        return self.callback_url if self.callback_url is not None else (self.callback_dst or "")

    def job_fields(self, default_max_retries: int, tenant: str = "") -> dict[str, Any]:
        """The request as stored in the job.accepted event (legacy callback_url normalised;
        the S3 fields and the submitting tenant only when there are some, so other jobs keep
        their earlier shape and fingerprint)."""
        s3 = {"s3_bucket": self.s3_bucket, "s3_region": self.s3_region} if self.s3_bucket else {}
        who = {"tenant": tenant} if tenant else {}
        return {
            "aggr_id": self.aggr_id,
            "aggr_limit": self.aggr_limit,
            "aggr_proxy": self.aggr_proxy or "",
            "url": self.url,
            "callback_type": self.callback_kind or "",
            "callback_dst": self.callback_target,
            "extra": self.extra,
            "mime_type": self.mime_type,
            "max_retries": default_max_retries if self.max_retries is None else self.max_retries,
            "extract_image_size": self.extract_image_size,
            "download_timeout": self.download_timeout or 0,
            "request_headers": {k: str(v) for k, v in self.request_headers.items()},
            **s3,
            **who,
        }


def check_s3_policy(req: DownloadRequest, s3: S3Config) -> None:
    """Refuse a bucket this service may not write to (S3 off, or not in s3.allowed_buckets)."""
    if req.s3_bucket is None:
        return
    if not s3.enabled:
        raise ValidationFailed("s3_bucket", "s3_bucket: S3 storage is not enabled on this service")
    if s3.allowed_buckets and req.s3_bucket not in s3.allowed_buckets:
        raise ValidationFailed(
            "s3_bucket", f"s3_bucket {req.s3_bucket!r} is not one of the allowed buckets"
        )


def check_extra_size(req: DownloadRequest, config: Config) -> None:
    """`extra` is stored with the job and sent back in its callback: bounded."""
    size = len(req.extra.encode())
    if size > config.api.max_extra_bytes:
        raise ValidationFailed(
            "extra",
            f"extra is {size} bytes, over the limit of {config.api.max_extra_bytes} "
            "(api.max_extra_bytes)",
        )


def check_default_credentials(req: DownloadRequest, config: Config) -> None:
    """Refuse credentials in `url` when the configured default headers (processor.
    request_headers) send an Authorization the job does not override: the HTTP client cannot
    send both."""
    if has_userinfo(URL(req.url)) and any(
        k.lower() == "authorization" for k in config.processor.request_headers
    ):
        raise ValidationFailed(
            "url",
            "url cannot carry credentials (user:password@) on this service: "
            "processor.request_headers sends an Authorization header with every download",
        )


def check_kafka_topic(req: DownloadRequest, config: Config) -> None:
    """Refuse a Kafka callback to a topic callers may not write to: an internal topic (`_*`),
    the event export topic, or one outside backends.kafka.allowed_topics when that is set."""
    if req.callback_kind != "kafka":
        return
    topic = req.callback_target
    why = kafka_topic_refusal(
        topic, config.backends.kafka_allowed_topics, config.events.kafka_topic
    )
    if why:
        raise ValidationFailed("callback_dst", f"callback_dst {topic!r} {why}")


def check_s3_region(req: DownloadRequest, config: Config) -> None:
    """Refuse a region outside s3.allowed_regions, when that is set."""
    allowed = config.s3.allowed_regions
    if req.s3_region is not None and allowed and req.s3_region not in allowed:
        raise ValidationFailed(
            "s3_region", f"s3_region {req.s3_region!r} is not one of the allowed regions"
        )


POLICIES: tuple[Callable[[DownloadRequest, Config], None], ...] = (
    check_extra_size,
    lambda req, config: check_s3_policy(req, config.s3),
    check_default_credentials,
    check_kafka_topic,
    check_s3_region,
)
"""The deployment's rules on a well-formed request, in order: each raises ValidationFailed."""


def _wrap(field: str, url: str) -> None:
    try:
        _check_http_url(url)
    except ValueError as exc:
        raise ValidationFailed(field, f"{field} {exc}") from exc


_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be a boolean (true or false)",
    "dict_type": "must be an object",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "literal_error": "must be one of: http, kafka",
}


def parse_download_request(body: Any, config: Config | None = None) -> DownloadRequest:
    """Validate a decoded JSON body against the rules, then against the service's policies
    (`config`: what this deployment allows); raises ValidationFailed naming the first bad
    field."""
    req = _parse(body)
    config = config or Config()
    for check in POLICIES:
        check(req, config)
    return req


def _parse(body: Any) -> DownloadRequest:
    if not isinstance(body, dict):
        raise ValidationFailed("body", "the body must be a JSON object")
    for key, value in body.items():
        if not _is_unicode(key) or not _is_unicode(value):
            name = key.encode("utf-8", "backslashreplace").decode()
            raise ValidationFailed(name, f"{name} must be valid Unicode text (no lone surrogates)")
    try:
        return DownloadRequest.model_validate(body)
    except ValidationFailed:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else "body"
        if err["type"] in ("value_error", "assertion_error") and isinstance(
            (ctx := err.get("ctx", {})).get("error"), ValidationFailed
        ):
            inner: ValidationFailed = ctx["error"]
            raise ValidationFailed(inner.field, str(inner)) from None
        if field == "request_headers" and len(loc) > 1:
            raise ValidationFailed(
                field, f"request_headers[{loc[1]!r}] must be a string or an integer"
            ) from None
        words = _TYPE_WORDS.get(err["type"]) or _predicate(err["msg"])
        raise ValidationFailed(field, f"{field} {words}") from None


def _is_unicode(value: Any, depth: int = 1) -> bool:
    """False if a string in `value` holds a lone surrogate: JSON lets "\\ud800" through,
    UTF-8 (redis-py, Lua cjson) does not. Looks one object deep (request_headers): the
    model's types reject anything deeper, and no recursion means no stack limit to hit."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(value, dict) and depth > 0:
        return all(_is_unicode(k, 0) and _is_unicode(v, 0) for k, v in value.items())
    return True


def _predicate(msg: str) -> str:
    """Turn pydantic's "Input should be > 0" into "must be > 0"; keep our own phrases."""
    msg = msg.removeprefix("Value error, ")
    for prefix in ("Input should", "String should", "Dictionary should", "List should"):
        if msg.startswith(prefix):
            return "must" + msg[len(prefix) :]
    return msg if msg.startswith("must") else f"is invalid: {msg}"
