"""Configuration: one pydantic model, validated once at start-up, overridable from the env."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from downloader.errors import ConfigError
from downloader.headerpolicy import header_problem

__all__ = [
    "ENV_PREFIX",
    "Config",
    "FilesystemStorage",
    "S3Config",
    "S3Storage",
    "is_bucket_name",
    "is_kafka_topic",
    "is_region_name",
    "kafka_topic_refusal",
    "load_config",
]

ENV_PREFIX = "DOWNLOADER__"

_BUCKET_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
_IPV4_SHAPE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}\Z")
# AWS reserves these for access points, Object Lambda, directory and table buckets
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# AWS names regions like eu-west-1 or us-gov-east-1; S3-compatible stores use e.g. "auto", "nyc3"
_REGION = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*\Z")
REGION_MAX = 32
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")
_KAFKA_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}\*?\Z")


def is_bucket_name(name: str) -> bool:
    """An S3 bucket name that is also a valid DNS name (it becomes part of a hostname):
    3-63 characters, dot-separated labels of lowercase letters, digits and inner hyphens, not
    shaped like an IPv4 address, none of AWS's reserved prefixes or suffixes."""
    return (
        3 <= len(name) <= 63
        and all(_BUCKET_LABEL.match(label) for label in name.split("."))
        and not _IPV4_SHAPE.match(name)
        and not name.startswith(_RESERVED_PREFIXES)
        and not name.endswith(_RESERVED_SUFFIXES)
    )


def is_region_name(name: str) -> bool:
    """A region name like eu-west-1: lowercase letters, digits and single hyphens, starting
    with a letter, at most REGION_MAX characters (it becomes part of the endpoint's hostname)."""
    return len(name) <= REGION_MAX and bool(_REGION.match(name))


def is_kafka_topic(name: str) -> bool:
    """A Kafka topic name: 1-249 of letters, digits, `.`, `_`, `-`."""
    return bool(_KAFKA_TOPIC.match(name))


def _bucket_name(v: str) -> str:
    if not is_bucket_name(v):
        raise ValueError(f"{v!r} is not a valid S3 bucket name")
    return v


def _region_name(v: str) -> str:
    if not is_region_name(v):
        raise ValueError(f"{v!r} is not a region name like eu-west-1")
    return v


BucketName = Annotated[str, AfterValidator(_bucket_name)]
RegionName = Annotated[str, AfterValidator(_region_name)]


def kafka_topic_refusal(
    topic: str, allowed_topics: tuple[str, ...], export_topic: str | None = None
) -> str:
    """Why callers may not have callbacks produced to `topic`, or '' when they may. Refused:
    a name starting with `_` (Kafka's internal `__consumer_offsets`, `__transaction_state`...,
    and by convention platform topics such as Schema Registry's `_schemas`), the event export
    topic, and, when `allowed_topics` is not empty, a topic none of its entries matches (an
    entry is a topic name, or a prefix followed by `*`)."""
    if topic.startswith("_"):
        return "is an internal topic (a name starting with _)"
    if export_topic is not None and topic == export_topic:
        return "is the service's event export topic"
    if allowed_topics and not any(
        topic.startswith(entry[:-1]) if entry.endswith("*") else topic == entry
        for entry in allowed_topics
    ):
        return "is not one of the allowed topics"
    return ""


def _host_port(addr: str, default_port: int) -> tuple[str, int]:
    """`host:port` (or `host`, or `:port`) -> (host, port); raises ValueError on a bad port."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep:
        host, port = port, ""
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{addr.strip()!r} is not host:port") from None
    if not 0 < number < 65536:
        raise ValueError(f"{addr.strip()!r} has no valid port")
    return host or "127.0.0.1", number


_ORIGIN = re.compile(r"^(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?/?\Z")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin(value: str) -> str:
    """A browser origin as browsers send it in `Origin`: lowercase, no default port, no path."""
    match = _ORIGIN.match(value.strip().lower())
    if not match:
        raise ValueError(f"{value!r} is not an origin like https://app.example.com[:port]")
    scheme, host, port = match.groups()
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisConfig(_Section):
    addr: str | None = None
    """`host:port`; with `sentinel: true`, comma-separated sentinels. Unset: `run` embeds Redis."""
    sentinel: bool | list[str] = False
    """`true` (the sentinels are `addr`), or the original's form: a list of sentinel `host:port`
    (then `addr` is not used); an empty list means no Sentinel."""
    master_name: str | None = None
    """The master's name at the sentinels (default `mymaster`)."""
    db: int = Field(0, ge=0)
    password: str | None = None
    key_prefix: str = Field("dl", min_length=1, max_length=64)
    embedded_dir: str = "var/redis"
    cluster: bool = False
    """Redis Cluster: `addr` names seed nodes (comma-separated `host:port`)."""
    shards: int = Field(16, ge=1, le=62)
    """Virtual shards the keys are spread over (the unit of Redis Cluster placement). Fixed for
    the life of the data: changing it strands every job (drain the service first)."""

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if re.search(r"[{}\s]", v):
            raise ValueError("must not hold braces or white space (it precedes the hash tags)")
        return v

    @field_validator("addr")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        for part in v.split(",") if v else []:
            _host_port(part, 6379)
        return v

    @field_validator("sentinel")
    @classmethod
    def _sentinel_list(cls, v: bool | list[str]) -> bool | list[str]:
        for part in v if isinstance(v, list) else []:
            _host_port(part, 26379)
        return v

    @model_validator(mode="after")
    def _sentinels_named(self) -> RedisConfig:
        if self.sentinel is True and not self.addr:
            raise ValueError("sentinel: true needs addr (the comma-separated sentinels)")
        if self.cluster and not self.addr:
            raise ValueError("cluster: true needs addr (comma-separated seed nodes)")
        if self.cluster and self.sentinels:
            raise ValueError("cluster and sentinel exclude each other")
        if self.cluster and self.db:
            raise ValueError("cluster: true needs db 0 (a Redis Cluster has no other database)")
        if self.addr and "," in self.addr and not (self.cluster or self.sentinel is True):
            raise ValueError(
                "addr names several servers: set cluster: true (seed nodes) or sentinel: true "
                "(sentinels); one Redis server is one host:port"
            )
        return self

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The seed nodes of a cluster (`addr`, comma-separated)."""
        return [_host_port(a, 6379) for a in (self.addr or "").split(",") if a.strip()]

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The sentinels to ask for the master, from either form; empty: no Sentinel."""
        if isinstance(self.sentinel, list):
            return [_host_port(a, 26379) for a in self.sentinel]
        if self.sentinel and self.addr:
            return [_host_port(a, 26379) for a in self.addr.split(",")]
        return []

    @property
    def master(self) -> str:
        return self.master_name or "mymaster"

    @property
    def server(self) -> tuple[str, int]:
        """`addr` as (host, port) when no Sentinel is used; raises ValueError when unset."""
        if not self.addr:
            raise ValueError("redis.addr is not set")
        return _host_port(self.addr, 6379)


_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")


def _signing_secret(v: str | None) -> str | None:
    if v is not None and not v.startswith("whsec_"):
        raise ValueError("must look like whsec_<base64>")
    return v


class TokenConfig(_Section):
    """One API token and what it may do: an entry of `api.tokens` (a plain string there is an
    admin token, as before tenants existed). Several tokens may share a tenant `name` (say one
    that submits and one that only reads): they then share its aggr_prefix and signing_secret."""

    name: str
    """The tenant: its jobs record it; 1-64 of letters, digits, `.`, `_`, `-`."""
    token: str | None = Field(None, min_length=1)
    sha256: str | None = None
    """The token's SHA-256, hex: the file then holds no usable secret."""
    role: Literal["admin", "submit", "read"] = "submit"
    aggr_prefix: str = Field("", max_length=128)
    """Every aggregation of this tenant starts with it (required unless the role is admin)."""
    signing_secret: str | None = None
    """`whsec_...`: this tenant's callbacks are signed with it (else notifier.signing_secret)."""
    rate_per_second: float | None = Field(None, gt=0)
    """Requests per second this token may make (a token bucket one second deep); none: no
    limit."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TENANT_NAME.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with one")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_HEX.match(v.lower()):
            raise ValueError("must be 64 hex digits (sha256sum of the token)")
        return v.lower() if v else v

    @field_validator("aggr_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if re.search(r"[\x00-\x1f\x7f]", v):
            raise ValueError("must not hold control characters")
        return v

    _whsec = field_validator("signing_secret")(_signing_secret)

    @model_validator(mode="after")
    def _one_secret_and_a_prefix(self) -> TokenConfig:
        if (self.token is None) == (self.sha256 is None):
            raise ValueError(f"token {self.name!r}: give exactly one of token and sha256")
        if self.role != "admin" and self.name == "admin":  # tenants.ADMIN_NAME
            raise ValueError(
                "token 'admin': the name admin is the plain admin tokens' tenant (their jobs "
                "record it); a submit or read token needs another name"
            )
        if self.role != "admin" and not self.aggr_prefix:
            raise ValueError(
                f"token {self.name!r}: a {self.role} token needs an aggr_prefix (its "
                "aggregations are those starting with it)"
            )
        return self


TokenEntry = Annotated[
    Annotated[str, Tag("str")] | Annotated[TokenConfig, Tag("object")],
    Discriminator(lambda v: "str" if isinstance(v, str) else "object"),
]
"""An `api.tokens` entry: a plain string (an admin token) or a TokenConfig object."""


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    heartbeat_path: str = "/tmp/disable-downloader"
    max_body_bytes: int = Field(64 * 1024, gt=0)
    tokens: list[TokenEntry] = []
    """Bearer tokens; when any is set, every endpoint but /hb and the dashboard page needs one.
    A string is an admin token; an object gives a tenant its name, role and limits."""
    idempotency_window_seconds: float = Field(86_400.0, gt=0)
    """How long an Idempotency-Key maps to its job."""
    serve_files: bool = False
    """Serve the file store under /files/ (for `make run`; use a real web server in production)."""
    allow_anonymous: bool = False
    """Serve without tokens on a non-loopback address (`api` and `run` refuse to otherwise)."""
    allowed_origins: list[str] = []
    """Browser origins (`scheme://host[:port]`) whose pages may call the API; a request carrying
    any other `Origin` header is refused with 403. Requests without `Origin` are unaffected."""
    header_timeout_seconds: float = Field(10.0, gt=0)
    """How long a connection may take to send a whole request head (from its first byte)."""
    body_timeout_seconds: float = Field(30.0, gt=0)
    """How long a request body may take to arrive, once its head has."""
    keepalive_timeout_seconds: float = Field(75.0, gt=0)
    """How long an idle keep-alive connection stays open between requests."""
    max_connections: int = Field(1000, gt=0)
    """Open client connections; beyond it the oldest idle one is closed, or when none is idle
    the new one is answered 503 and closed."""

    max_extra_bytes: int = Field(8 * 1024, gt=0)
    """The largest `extra` of a job (UTF-8 bytes): it is stored with the job and sent back."""
    max_aggregations_per_tenant: int = Field(10_000, gt=0)
    """Aggregations with unfinished jobs one tenant (or the anonymous caller) may have at once."""
    aggregations_page_limit: int = Field(1000, gt=0)
    """The most entries one GET /dashboard/aggregations answers (`?limit=` asks for fewer)."""

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return [_origin(o) for o in v]

    @field_validator("tokens")
    @classmethod
    def _tenants(cls, v: list[str | TokenConfig]) -> list[str | TokenConfig]:
        objects = [t for t in v if isinstance(t, TokenConfig)]
        if any(isinstance(t, str) and not t for t in v):
            raise ValueError("a token must not be empty")
        tenants: dict[str, TokenConfig] = {}
        for t in objects:
            first = tenants.setdefault(t.name, t)
            if (first.aggr_prefix, first.signing_secret) != (t.aggr_prefix, t.signing_secret):
                raise ValueError(
                    f"the tokens of tenant {t.name!r} must share one aggr_prefix and one "
                    "signing_secret"
                )
        prefixes = sorted(
            {t.aggr_prefix for t in tenants.values() if t.role != "admin" or t.aggr_prefix}
        )
        for shorter, longer in itertools.pairwise(prefixes):  # sorted: neighbours suffice
            if longer.startswith(shorter):
                raise ValueError(
                    f"aggr_prefix {shorter!r} contains {longer!r}: two tenants would share "
                    "aggregations"
                )
        return v


class FilesystemStorage(_Section):
    """Files at `<rootdir>/<id[0:3]>/<id>`, their temporary files in `<rootdir>/.tmp`."""

    type: Literal["filesystem"]
    rootdir: str | None = None
    """Unset: processor.storage_dir."""


class S3Storage(_Section):
    """Every job's file in one bucket at `<id[0:3]>/<id>`, reaped like a local file; the
    temporary files in `<processor.storage_dir>/.tmp`; credentials and endpoint from `s3`."""

    type: Literal["s3"]
    region: RegionName
    bucket: BucketName


FileStorage = Annotated[FilesystemStorage | S3Storage, Field(discriminator="type")]


class ProcessorConfig(_Section):
    storage_dir: str = "var/files"
    """The file store when `filestorage` is the filesystem without `rootdir`; with S3, where
    downloads are written before their upload."""
    filestorage: FileStorage = FilesystemStorage(type="filesystem")
    request_headers: dict[str, str] = {}
    download_url: str = "http://localhost:8000/files"
    stats_interval: int = Field(5000, gt=0, description="milliseconds")
    retry_backoff_seconds: float = Field(30.0, ge=0)
    retry_backoff_cap_seconds: float = Field(3600.0, ge=0)
    max_retries: int = Field(2, ge=0)
    max_download_bytes: int = Field(2 * 1024**3, gt=0)
    download_timeout_seconds: float = Field(3600.0, gt=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    max_workers: int = Field(256, gt=0)
    max_workers_per_aggregation: int | None = Field(None, gt=0)
    """Workers of this processor one aggregation may hold at once; unset: half of
    max_workers (at least 1), so one aggregation's slow downloads leave room for the others."""
    read_idle_timeout_seconds: float = Field(30.0, gt=0)
    """A download fails (transient) when the origin sends nothing for this long."""
    min_bytes_per_second: int = Field(1024, ge=0)
    """A download averaging less than this once min_throughput_window_seconds have passed
    fails (transient); 0 turns the rule off."""
    min_throughput_window_seconds: float = Field(30.0, gt=0)
    lease_ms: int = Field(30_000, ge=100)
    rescan_interval_ms: int = Field(5_000, ge=10)
    disk_pause_percent: float = Field(95.0, gt=0, le=100)
    disk_resume_percent: float = Field(90.0, gt=0, le=100)
    disk_check_interval_ms: int = Field(5_000, ge=10)
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    """Where a standalone processor serves its metrics (0.0.0.0: every interface)."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    @field_validator("request_headers")
    @classmethod
    def _default_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if problem := header_problem(name, value):
                raise ValueError(problem)
        return v

    @field_validator("filestorage", mode="before")
    @classmethod
    def _filestorage_forms(cls, v: Any) -> Any:
        """The flat `"filesystem"` of earlier versions; an object without `type` (as env
        overrides of `rootdir` alone make) is the filesystem."""
        if isinstance(v, str):
            return {"type": v}
        if isinstance(v, dict) and "type" not in v:
            return {"type": "filesystem", **v}
        return v

    @model_validator(mode="after")
    def _resume_below_pause(self) -> ProcessorConfig:
        if self.disk_resume_percent > self.disk_pause_percent:
            raise ValueError("disk_resume_percent must not exceed disk_pause_percent")
        return self

    @property
    def aggregation_workers(self) -> int:
        """The most workers of one processor that one aggregation may hold."""
        if self.max_workers_per_aggregation is not None:
            return min(self.max_workers_per_aggregation, self.max_workers)
        return max(1, self.max_workers // 2)

    @property
    def files_root(self) -> str | None:
        """The directory of the filesystem store (`filestorage.rootdir`, else `storage_dir`);
        None when files go to an S3 bucket."""
        if isinstance(self.filestorage, S3Storage):
            return None
        return self.filestorage.rootdir or self.storage_dir


class NotifierConfig(_Section):
    concurrency: int = Field(10, gt=0)
    stats_interval: int = Field(5000, gt=0, description="milliseconds")
    deletion_interval: float = Field(60.0, ge=0, description="minutes")
    retry_schedule_seconds: list[float] = [10.0, 60.0, 300.0, 1800.0]
    heartbeat_ms: int = Field(1000, ge=10, description="how often a notifier says it is alive")
    dead_after_ms: int = Field(
        5000,
        ge=20,
        validate_default=True,
        description="a notifier silent this long is gone: its callbacks move on",
    )
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    """Where a standalone notifier serves its metrics (0.0.0.0: every interface)."""
    signing_secret: str | None = None
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    @field_validator("dead_after_ms")
    @classmethod
    def _lapse_spans_beats(cls, v: int, info: ValidationInfo) -> int:
        # one late beat must not make a live notifier look dead
        beat = info.data.get("heartbeat_ms")
        if beat is not None and v < 2 * beat:
            raise ValueError(f"must be at least twice notifier.heartbeat_ms ({beat})")
        return v

    @field_validator("retry_schedule_seconds")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError("every delay must be >= 0")
        return v

    _whsec = field_validator("signing_secret")(_signing_secret)


class HttpBackendConfig(_Section):
    timeout: float = Field(60.0, gt=0, description="seconds")


class BackendsConfig(_Section):
    http: HttpBackendConfig | None = None
    kafka: dict[str, Any] | None = None
    """librdkafka properties, passed through; and ours, taken out before librdkafka sees them:
    `allowed_topics` (a list of topic names, or prefixes followed by `*`; empty: any topic)."""

    @field_validator("kafka")
    @classmethod
    def _allowed_topics(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        entries = (v or {}).get("allowed_topics", [])
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(
                "allowed_topics must be a list of topic names or prefixes followed by *"
            )
        for entry in entries:
            if not _KAFKA_TOPIC_PATTERN.match(entry):
                raise ValueError(
                    f"allowed_topics: {entry!r} is not a topic name ([A-Za-z0-9._-], 1-249 "
                    f"characters), nor one followed by * (a prefix)"
                )
            if entry.startswith("_"):
                raise ValueError(
                    f"allowed_topics: {entry!r} names internal topics (starting with _), "
                    f"which callers may never use"
                )
        return v

    @property
    def kafka_allowed_topics(self) -> tuple[str, ...]:
        """`backends.kafka.allowed_topics`: the topics callbacks may go to; empty: any."""
        return tuple((self.kafka or {}).get("allowed_topics", ()))


DEFAULT_SECRET_QUERY_PARAMS = (
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
)


class SecurityConfig(_Section):
    allow_private_networks: bool = False
    allowed_networks: list[str] = []
    secret_headers: list[str] = []
    """Request header names that carry secrets, besides Authorization, Proxy-Authorization,
    Cookie and Set-Cookie (always secret): never shown, and dropped on a cross-origin redirect.
    Kept lowercased (header names are case-insensitive)."""
    secret_query_params: list[str] = list(DEFAULT_SECRET_QUERY_PARAMS)
    """URL query parameters whose values are secrets (case-insensitive): never shown."""
    allow_https_downgrade: bool = False
    """Follow a redirect from https to plain http (false: the download fails)."""

    @field_validator("secret_headers")
    @classmethod
    def _lowercase(cls, v: list[str]) -> list[str]:
        return [name.lower() for name in v]

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR network") from exc
        return v


class S3Config(_Section):
    """The S3 destination: jobs naming `s3_bucket` are uploaded there instead of the file store."""

    enabled: bool = False
    endpoint_url: str | None = None
    """For S3-compatible stores (MinIO, Ceph, moto); unset: AWS's endpoint of the job's region."""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    """Both or neither; neither: boto3's default chain (env, shared files, instance role)."""
    key_prefix: str = Field("", max_length=512)
    """Object key = key_prefix + job id."""
    allowed_buckets: list[BucketName] = []
    """When non-empty, jobs may only name these buckets."""
    allowed_regions: list[RegionName] = []
    """When non-empty, jobs may only name these regions (`s3_region`)."""
    max_clients: int = Field(16, ge=1, le=1024)
    """S3 clients kept, one per region (about 0.4 MiB each); beyond it the least recently used
    is closed once no upload uses it."""
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    max_attempts: int = Field(3, ge=1, le=20)
    """Attempts of each S3 request inside one upload (botocore's standard retry mode)."""
    connect_timeout_seconds: float = Field(10.0, gt=0)
    read_timeout_seconds: float = Field(60.0, gt=0)
    upload_concurrency: int = Field(4, ge=1, le=64)
    """Parts of one multipart upload sent in parallel (memory: about this x 8 MiB per upload)."""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or re.search(r"[\x00-\x1f\x7f]", v):
            raise ValueError("must not start with / nor hold control characters")
        return v

    @model_validator(mode="after")
    def _key_pair(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        return self


class LogConfig(_Section):
    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class EventsConfig(_Section):
    retention_hours: float = Field(72.0, gt=0)
    """How long a settled job (callback done, file gone) keeps its projection and events."""
    stream_maxlen: int = Field(100_000, gt=0)
    """Approximate cap on each shard's event stream (the feed of the export)."""
    stream_window_minutes: float = Field(60.0, gt=0)
    """How long an event stays in its shard's stream (the export must keep within it); a job's
    own events last as long as the job (retention_hours)."""
    kafka_topic: str | None = None
    """The event export topic: never one of Kafka's internal topics (`__*`); callers can never
    name it as their callback_dst."""
    export_lock_ms: int = Field(10_000, ge=100)
    """How long a dead exporter's lock keeps others from taking over the export."""

    @field_validator("kafka_topic")
    @classmethod
    def _export_topic(cls, v: str | None) -> str | None:
        if v is not None and not is_kafka_topic(v):
            raise ValueError("must be a Kafka topic name ([A-Za-z0-9._-], 1-249 characters)")
        if v is not None and v.startswith("__"):
            raise ValueError(f"{v!r} is one of Kafka's internal topics (starting with __)")
        return v


class Config(_Section):
    redis: RedisConfig = RedisConfig()
    api: ApiConfig = ApiConfig()
    processor: ProcessorConfig = ProcessorConfig()
    notifier: NotifierConfig = NotifierConfig()
    backends: BackendsConfig = BackendsConfig()
    security: SecurityConfig = SecurityConfig()
    log: LogConfig = LogConfig()
    events: EventsConfig = EventsConfig()
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _export_needs_kafka(self) -> Config:
        if self.events.kafka_topic and self.backends.kafka is None:
            raise ValueError("events.kafka_topic needs backends.kafka (the producer settings)")
        if self.api.serve_files and self.processor.files_root is None:
            raise ValueError(
                "api.serve_files needs files on the filesystem (processor.filestorage)"
            )
        return self

    @model_validator(mode="after")
    def _export_topic_not_allowed(self) -> Config:
        if self.events.kafka_topic in self.backends.kafka_allowed_topics:
            raise ValueError(
                f"backends.kafka.allowed_topics names the event export topic "
                f"{self.events.kafka_topic!r} (events.kafka_topic), which callers may never use"
            )
        return self


# Keys of the original's config that mean nothing here: dropped before validation, each with a
# warning saying what to use instead. Anything else unknown stays an error.
_ORIGINAL_ONLY = {  # and keys of our own that are gone
    ("notifier", "download_url"): (
        "notifier.download_url is ignored: the base of download_url in callbacks is "
        "processor.download_url (the original moved it there too)"
    ),
    ("notifier", "claim_idle_ms"): (
        "notifier.claim_idle_ms is deprecated and ignored: a gone notifier's callbacks move "
        "on after notifier.dead_after_ms"
    ),
}
_FILESTORAGE_KEYS_OF = {"filesystem": {"rootdir"}, "s3": {"region", "bucket"}}
_FILESTORAGE_KEYS = {"rootdir", "region", "bucket"}
_GO_CLIENT_HINTS = {
    "go.delivery.reports": "delivery reports are always on here",
    "go.delivery.report.fields": "delivery reports carry what the notifier needs",
    "go.produce.channel.size": "bound the producer queue with queue.buffering.max.messages",
    "go.events.channel.enable": "there is no events channel here",
    "go.events.channel.size": "there is no events channel here",
    "go.logs.channel.enable": "librdkafka logs to stderr",
    "go.logs.channel": "librdkafka logs to stderr",
}


def _node(raw: dict[str, Any], *path: str) -> dict[str, Any]:
    """The object at `path` in a raw config, or an empty one when it is not an object."""
    node: Any = raw
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _drop_original_only(raw: dict[str, Any]) -> list[str]:
    """Remove the original's keys that mean nothing here from `raw`; one warning each."""
    warnings = []
    redis = _node(raw, "redis")
    if (
        isinstance(redis.get("sentinel"), list)
        and redis["sentinel"]
        and not redis.get("master_name")
    ):
        del redis["sentinel"]  # the original then connects to addr
        warnings.append(
            "redis.sentinel is ignored without redis.master_name, as the original did: "
            "set redis.master_name to use Sentinel"
        )
    filestorage = _node(raw, "processor", "filestorage")
    kind = filestorage.get("type")
    if isinstance(kind, str) and kind in _FILESTORAGE_KEYS_OF:
        for key in sorted(_FILESTORAGE_KEYS - _FILESTORAGE_KEYS_OF[kind]):
            if key in filestorage:  # the original's filestorage was a map: it ignored the others
                del filestorage[key]
                warnings.append(f"processor.filestorage.{key} is ignored with type {kind!r}")
    for (section, key), why in _ORIGINAL_ONLY.items():
        node = _node(raw, section)
        if key in node:
            del node[key]
            warnings.append(why)
    kafka = _node(raw, "backends", "kafka")
    for name in [k for k in kafka if k.startswith("go.")]:
        del kafka[name]
        hint = _GO_CLIENT_HINTS.get(name, "librdkafka has no such setting")
        warnings.append(
            f"backends.kafka[{name!r}] is ignored: a setting of the Go client "
            f"(confluent-kafka-go) that librdkafka does not know; {hint}"
        )
    return warnings


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> None:
    """`DOWNLOADER__SECTION__KEY=value` sets `section.key`; a value that parses as JSON is JSON."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = parsed


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = list(e["loc"])
        if loc[:2] == ["processor", "filestorage"] and len(loc) > 3:
            del loc[2]  # pydantic puts the union's tag (filesystem, s3) in the path
        if loc[:2] == ["api", "tokens"] and len(loc) > 3:
            del loc[3]  # and the tag of a token entry (str, object)
        key = ".".join(str(p) for p in loc) or "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None,
    environ: dict[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Read `path` (missing file: defaults), apply env overrides, validate. Raises ConfigError.
    Keys of the original service that mean nothing here are dropped, each with a sentence
    appended to `warnings` saying what to use instead."""
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path is not None and Path(path).exists():
        try:
            loaded = json.loads(Path(path).read_text())
        except ValueError as exc:
            raise ConfigError(f"invalid configuration in {source}: not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid configuration in {source}: the top level must be an object")
        raw = loaded
    elif path is not None and Path(path).name != "config.json":
        raise ConfigError(f"configuration file {source} does not exist")
    _apply_env(raw, environ)
    notes = _drop_original_only(raw)
    if warnings is not None:
        warnings.extend(notes)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
