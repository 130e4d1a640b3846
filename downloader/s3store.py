"""The S3 destination: uploads a finished download to the job's bucket with boto3.

boto3's managed `upload_file` (s3transfer) does the work: a single PUT or a multipart upload
read from the file part by part, so memory does not grow with the file size. It is blocking,
so it runs on a thread pool of our own (the loop's default pool stays free for the short hops
other code makes). boto3 clients are thread-safe once created, sessions are not: clients are
created under a lock, one per region, and shared by every upload.

Callers choose the region, so the clients (about 0.4 MiB each) are kept in a bounded cache,
least recently used out (`s3.max_clients`). Uploads lease a client; one evicted while leased is
closed when its last lease ends, never under a running upload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from downloader.config import S3Config
from downloader.errors import PermanentError, TransientError
from downloader.headerpolicy import HEADER_NAME

__all__ = ["METADATA_MAX_BYTES", "S3Store", "classify_s3_error", "user_metadata"]

METADATA_MAX_BYTES = 2048
"""S3's limit on user metadata: the UTF-8 bytes of every key and value, summed."""
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*\Z")

# S3 error codes that mean "this bucket or these credentials will not take the object": retrying
# cannot help. Any other 4xx is also permanent, except the throttling/timeout codes below.
_PERMANENT_MESSAGES = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access to bucket {bucket!r} was denied",
    "AllAccessDisabled": "access to bucket {bucket!r} is disabled",
    "InvalidAccessKeyId": "the access key is not valid for bucket {bucket!r}",
    "SignatureDoesNotMatch": "the secret key is not valid for bucket {bucket!r}",
    "AccountProblem": "the account of bucket {bucket!r} has a problem",
    "InvalidBucketName": "bucket name {bucket!r} is not valid",
}
_RETRIABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "ExpiredToken",  # temporary credentials: the provider refreshes them
    }
)


@dataclass
class _Client:
    """A region's client, how many leases hold it, and whether the cache let go of it."""

    client: Any
    leases: int = 0
    evicted: bool = False


class _Cancelled(Exception):
    """Raised from the progress callback to stop an upload whose job was cancelled."""


def user_metadata(extra: str) -> dict[str, str]:
    """The S3 user metadata of a job, from its `extra` as the original derives it: when `extra`
    is a JSON object, its string values, and its numbers as integers (truncated toward zero, as
    the original formats them); other values are left out. Not a JSON object: none.

    Keys and values travel as `x-amz-meta-<key>: <value>` headers, so a key must be an HTTP
    token and a value printable ASCII, and all of them fit S3's 2 KB; else ValueError."""
    try:
        doc = json.loads(extra) if extra else None
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = str(value)
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = str(int(value))
    for key, value in out.items():
        if not HEADER_NAME.match(key):
            raise ValueError(f"key {key!r} is not a valid HTTP header name")
        if not _PRINTABLE_ASCII.match(value):
            raise ValueError(f"the value of {key!r} is not printable ASCII")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in out.items())
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"it is {size} bytes, over S3's {METADATA_MAX_BYTES}")
    return out


def classify_s3_error(
    exc: BaseException, bucket: str, action: str = "upload"
) -> TransientError | PermanentError:
    """Our error for a failed S3 request: transient (network, 5xx, throttling) or permanent (no
    such bucket, access denied, bad credentials, other 4xx). The sentence names the bucket."""
    failed = f"S3 {action} failed"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = err.get("Message") or code or f"HTTP {status}"
        if code in _PERMANENT_MESSAGES:
            return PermanentError(
                f"{failed}: {_PERMANENT_MESSAGES[code].format(bucket=bucket)} ({code})"
            )
        message = f"{failed}: bucket {bucket!r}: {detail} ({code or status})"
        if code in _RETRIABLE_CODES or status >= 500 or status in (408, 429) or status == 0:
            return TransientError(message)
        return PermanentError(message)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return PermanentError(f"{failed}: no usable AWS credentials ({exc})")
    if isinstance(exc, ConnectionError | HTTPClientError):
        return TransientError(f"{failed}: {exc}")
    if isinstance(exc, BotoCoreError):
        return PermanentError(f"{failed}: {exc}")
    return TransientError(f"{failed}: {type(exc).__name__}: {exc}")


class S3Store:
    """Uploads to S3 with the `s3` section's endpoint, credentials and timeouts: a job's own
    bucket at `<s3.key_prefix><job id>` (never deleted by us), or the file store's bucket."""

    def __init__(self, cfg: S3Config, max_uploads: int) -> None:
        self.cfg = cfg
        self._session = boto3.session.Session(
            aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key
        )
        self._botocore = BotoConfig(
            s3={"addressing_style": cfg.addressing_style},
            retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_seconds,
            read_timeout=cfg.read_timeout_seconds,
            max_pool_connections=max(10, cfg.upload_concurrency * 4),
        )
        self._transfer = TransferConfig(max_concurrency=cfg.upload_concurrency)
        self._clients: OrderedDict[str, _Client] = OrderedDict()  # least recently used first
        self._draining = 0  # evicted clients still leased
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_uploads, thread_name_prefix="s3-upload")

    def key(self, job_id: str) -> str:
        return f"{self.cfg.key_prefix}{job_id}"

    @staticmethod
    def url(bucket: str, key: str) -> str:
        """The `download_url` of an object: the s3:// URI the AWS CLI and SDKs take."""
        return f"s3://{bucket}/{key}"

    @contextlib.contextmanager
    def lease(self, region: str) -> Iterator[Any]:
        """The S3 client of `region`, for the block: made once, kept among the `s3.max_clients`
        most recently used. A client evicted meanwhile is closed when its last lease ends."""
        unused: list[_Client] = []
        with self._lock:
            entry = self._clients.get(region)
            if entry is None:
                entry = _Client(
                    self._session.client(
                        "s3",
                        region_name=region,
                        endpoint_url=self.cfg.endpoint_url,
                        config=self._botocore,
                    )
                )
                self._clients[region] = entry
                while len(self._clients) > self.cfg.max_clients:
                    _region, old = self._clients.popitem(last=False)
                    old.evicted = True
                    if old.leases:
                        self._draining += 1
                    else:
                        unused.append(old)
            else:
                self._clients.move_to_end(region)
            entry.leases += 1
        for old in unused:
            old.client.close()
        try:
            yield entry.client
        finally:
            with self._lock:
                entry.leases -= 1
                last = entry.evicted and entry.leases == 0
                if last:
                    self._draining -= 1
            if last:
                entry.client.close()

    @property
    def open_clients(self) -> int:
        """Clients not closed: the cached ones and the evicted ones still leased."""
        with self._lock:
            return len(self._clients) + self._draining

    def delete(self, bucket: str, region: str, key: str) -> None:
        """Delete one object (blocking: run it in a thread); a missing object is no error.
        Raises botocore's errors."""
        with self.lease(region) as client:
            client.delete_object(Bucket=bucket, Key=key)

    async def upload(
        self,
        path: Path,
        bucket: str,
        region: str,
        key: str,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Upload `path` to `bucket`/`key` with user `metadata`, overwriting: a job uploaded
        twice (its processor died before recording) ends with the same object. Raises
        TransientError or PermanentError; cancelling this stops the transfer at its next chunk."""
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        extra_args: dict[str, Any] = {"ContentType": content_type}
        if metadata:
            extra_args["Metadata"] = metadata
        future = loop.run_in_executor(
            self._pool, self._upload, path, bucket, region, key, extra_args, cancelled
        )
        try:
            await future
        except asyncio.CancelledError:
            cancelled.set()  # the thread cannot be interrupted: it stops at its next chunk
            raise
        except S3UploadFailedError as exc:  # boto3 wraps the ClientError it was handling
            cause = exc.__context__ if isinstance(exc.__context__, ClientError) else exc
            raise classify_s3_error(cause, bucket) from exc
        except Exception as exc:
            raise classify_s3_error(exc, bucket) from exc

    def _upload(
        self,
        path: Path,
        bucket: str,
        region: str,
        key: str,
        extra_args: dict[str, Any],
        cancelled: threading.Event,
    ) -> None:
        def progress(_bytes: int) -> None:
            if cancelled.is_set():
                raise _Cancelled

        with self.lease(region) as client:
            client.upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs=extra_args,
                Config=self._transfer,
                Callback=progress,
            )

    def close(self) -> None:
        """Stop taking uploads and close the clients' connection pools."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for entry in self._clients.values():
                entry.client.close()
            self._clients.clear()
