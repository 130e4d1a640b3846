"""The S3 destination against a real S3-compatible server (moto, in a child process): uploads
with and without a callback, failures that are and are not retried, a re-upload after a crash,
and the validation of s3_bucket / s3_region."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from downloader.errors import PermanentError, TransientError
from downloader.ids import shard_of
from downloader.s3store import classify_s3_error
from harness.moto_server import REGION, MotoServer, get_object, make_bucket, object_keys
from harness.redis_nodes import StrRedis, data_keys
from harness.servers import CallbackReceiver, FileServer, TcpRelay, job_request, until
from tests.conftest import Service
from tests.images import png

ServiceFactory = Callable[..., Any]
PREFIX = "dl/"


@pytest.fixture
async def svc(service_factory: ServiceFactory, moto: MotoServer) -> Service:
    """The whole service with S3 enabled against the module's moto server."""
    return await service_factory({"s3": moto.settings(key_prefix=PREFIX)})  # type: ignore[no-any-return]


async def callbacks_queued(r: StrRedis, service: Service) -> int:
    """Entries on every shard's callbacks stream."""
    keys = service.storage.keys
    return sum([await r.xlen(keys.callbacks(s)) for s in range(keys.shards)])


def s3_job(url: str, bucket: str, **fields: Any) -> dict[str, Any]:
    """A POST /download body storing into `bucket`, without a callback."""
    return {
        "aggr_id": "s3",
        "aggr_limit": 4,
        "url": url,
        "s3_bucket": bucket,
        "s3_region": REGION,
        **fields,
    }


def assert_nothing_local(service: Service, job_id: str) -> None:
    root = Path(service.config.processor.storage_dir)
    assert not (root / job_id[:3] / job_id).exists()
    assert list((root / ".tmp").iterdir()) == []


# -- uploads ----------------------------------------------------------------------------------


async def test_job_with_bucket_and_callback_is_uploaded_and_called_back(
    svc: Service,
    moto: MotoServer,
    bucket: str,
    files: FileServer,
    receiver: CallbackReceiver,
    redis_client: StrRedis,
) -> None:
    """A job naming a bucket lands in s3://<bucket>/<key_prefix><id> with its sniffed
    Content-Type, nothing stays on local disk, and the callback points at the s3:// URI."""
    image = png(7, 5)
    url = files.add("/a.png", image)
    body = job_request(
        url,
        receiver.url("/cb"),
        s3_bucket=bucket,
        s3_region=REGION,
        mime_type="image/*",
        extract_image_size=True,
        extra="x",
    )
    job_id = await svc.submit(**body)
    key = f"{PREFIX}{job_id}"
    [payload] = await receiver.wait_for(job_id)
    assert payload["success"] is True, payload
    assert payload["download_url"] == f"s3://{bucket}/{key}"
    assert (payload["image_size"], payload["extra"], payload["error"]) == ("7x5", "x", "")

    assert await get_object(moto, bucket, key) == (image, "image/png")
    job = await svc.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert {k: job[k] for k in ("file_state", "s3_bucket", "s3_region", "s3_key")} == {
        "file_state": "s3",
        "s3_bucket": bucket,
        "s3_region": REGION,
        "s3_key": key,
    }
    assert job["download_url"] == f"s3://{bucket}/{key}"
    events = await svc.events(job_id)
    assert [e["type"] for e in events] == [
        "job.accepted",
        "download.started",
        "download.succeeded",
        "callback.attempted",
        "callback.delivered",
    ]
    assert events[0]["data"]["s3_bucket"] == bucket
    assert events[2]["data"] == {
        "attempt": 1,
        "response_code": 200,
        "download_url": f"s3://{bucket}/{key}",
        "s3_bucket": bucket,
        "s3_key": key,
        "file_mime_type": "image/png",
        "file_bytes": len(image),
        "image_size": "7x5",
    }
    assert_nothing_local(svc, job_id)
    # S3 objects are never reaped: nothing is scheduled, and the job is settled (it expires)
    assert await redis_client.zscore(svc.storage.keys.reap(shard_of(job_id)), job_id) is None
    assert await redis_client.pttl(svc.storage.keys.done(job_id)) > 0


async def test_job_with_bucket_and_no_callback_is_uploaded_without_any_callback(
    service_factory: ServiceFactory,
    moto: MotoServer,
    bucket: str,
    files: FileServer,
    redis_client: StrRedis,
) -> None:
    """A job with a bucket and no callback is uploaded, never queued for a callback, shows
    callback_state NotRequested, settles, refuses /retry, and rebuilds to the same projection."""
    # no notifier: a callback entry, had one been queued, would stay in the stream for us to see
    svc = await service_factory({"s3": moto.settings(key_prefix=PREFIX)}, {"api", "processor"})
    data = b"plain text to keep\n" * 100
    job_id = await svc.submit(**s3_job(files.add("/t.txt", data), bucket))
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")

    assert await get_object(moto, bucket, f"{PREFIX}{job_id}") == (data, "text/plain")
    assert (job["callback_state"], job["callback_type"], job["callback_dst"]) == (
        "NotRequested",
        "",
        "",
    )
    assert await callbacks_queued(redis_client, svc) == 0
    assert [e["type"] for e in await svc.events(job_id)] == [
        "job.accepted",
        "download.started",
        "download.succeeded",
    ]
    # settled: packed into one key, kept for events.retention_hours
    assert await redis_client.exists(svc.storage.keys.job(job_id)) == 0
    assert await redis_client.pttl(svc.storage.keys.done(job_id)) > 0

    status, body = await svc.post(f"/retry/{job_id}")
    assert status == 409, body
    assert "no callback" in body["error"] and body["field"] == "job_id"

    # a packed job's projection is folded from its events whenever it is read
    assert await svc.storage.rebuild(job_id) == 0
    assert await svc.job(job_id) == job
    assert_nothing_local(svc, job_id)


async def test_multipart_upload_of_a_large_file_is_byte_identical(
    svc: Service, moto: MotoServer, bucket: str, files: FileServer
) -> None:
    """A file over the multipart threshold (8 MiB) arrives whole: same bytes, same length."""
    # random bytes behind a fixed start: random ones alone can open like a zlib stream (1 in
    # ~500), which libmagic then names
    data = b"\x00\x00\x00\x00" + os.urandom(20 * 1024 * 1024 + 119)
    job_id = await svc.submit(**s3_job(files.add("/big.bin", data), bucket))
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Success", timeout=30)
    body, content_type = await get_object(moto, bucket, f"{PREFIX}{job_id}")
    assert body == data and content_type == "application/octet-stream"
    assert job["file_bytes"] == len(data)


# -- failures ---------------------------------------------------------------------------------


async def test_bucket_that_does_not_exist_fails_the_job_without_retrying(
    svc: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """NoSuchBucket is permanent: one attempt, a failure callback naming the bucket."""
    url = files.add("/x.txt", b"hello")
    missing = "no-such-bucket-here"
    job_id = await svc.submit(
        **job_request(url, receiver.url("/cb"), s3_bucket=missing, s3_region=REGION, max_retries=3)
    )
    [payload] = await receiver.wait_for(job_id)
    assert payload["success"] is False and payload["download_url"] == ""
    assert payload["error"] == (
        f"S3 upload failed: bucket {missing!r} does not exist (NoSuchBucket)"
    )
    assert payload["response_code"] == 200  # the download itself went fine
    job = await svc.job(job_id)
    assert (job["download_state"], job["download_attempts"], job["file_state"]) == (
        "Failed",
        1,
        "none",
    )
    assert "download.retry_scheduled" not in [e["type"] for e in await svc.events(job_id)]
    assert_nothing_local(svc, job_id)


async def test_unknown_access_key_fails_the_job_without_retrying(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """InvalidAccessKeyId (a server that checks keys) is permanent and the error says so."""
    server = MotoServer(auth_after=1).start()  # the one free request creates the bucket
    try:
        bucket = await make_bucket(server)
        svc = await service_factory({"s3": server.settings()})
        url = files.add("/k.txt", b"hello")
        job_id = await svc.submit(
            **job_request(
                url, receiver.url("/cb"), s3_bucket=bucket, s3_region=REGION, max_retries=3
            )
        )
        [payload] = await receiver.wait_for(job_id)
        assert payload["error"] == (
            f"S3 upload failed: the access key is not valid for bucket {bucket!r} "
            "(InvalidAccessKeyId)"
        )
        assert (await svc.job(job_id))["download_attempts"] == 1
    finally:
        await asyncio.to_thread(server.stop)


async def test_s3_down_is_retried_until_it_is_back(
    service_factory: ServiceFactory,
    moto: MotoServer,
    moto_relay: TcpRelay,
    bucket: str,
    files: FileServer,
) -> None:
    """With the S3 endpoint down (connections refused) the upload is retried like a download,
    counting toward max_retries with the error `S3 upload failed: ...`; once the endpoint is
    back the job succeeds. The endpoint is a relay in front of moto, so that the bucket
    outlives the outage (moto keeps its state in memory only)."""
    settings = moto.settings(endpoint_url=f"http://127.0.0.1:{moto_relay.port}")
    svc = await service_factory({"s3": settings, "processor": {"retry_backoff_seconds": 0.05}})
    await moto_relay.stop()
    data = b"retry me\n" * 10
    job_id = await svc.submit(**s3_job(files.add("/r.txt", data), bucket, max_retries=50))
    job = await svc.wait_job(job_id, lambda j: j["download_attempts"] >= 3)
    assert job["error"].startswith("S3 upload failed: Could not connect"), job
    assert job["response_code"] == 200

    await moto_relay.start()
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")
    assert await get_object(moto, bucket, job_id) == (data, "text/plain")
    events = await svc.events(job_id)
    retries = [e for e in events if e["type"] == "download.retry_scheduled"]
    assert len(retries) >= 2
    assert all(e["data"]["error"].startswith("S3 upload failed") for e in retries)
    assert job["download_attempts"] == len(retries) + 1


async def test_upload_after_a_crash_goes_again_to_the_same_key(
    service_factory: ServiceFactory, moto: MotoServer, bucket: str, files: FileServer
) -> None:
    """A processor that uploaded and died before recording: its lease expires, another
    processor downloads and uploads again to the same key, and the job succeeds once."""
    api = await service_factory({"s3": moto.settings(key_prefix=PREFIX)}, {"api"})
    data = b"the fresh download\n"
    job_id = await api.submit(**s3_job(files.add("/c.txt", data), bucket))
    key = f"{PREFIX}{job_id}"
    # the processor that dies: it claims the job, uploads, and records nothing
    claim = await api.storage.claim(shard_of(job_id), "s3", "dead-processor", 1000, 1)
    assert [j.id for j in claim.jobs] == [job_id]
    await asyncio.to_thread(
        moto.client().put_object, Bucket=bucket, Key=key, Body=b"the dead one's upload"
    )

    await service_factory({"s3": moto.settings(key_prefix=PREFIX)}, {"processor"})
    job = await api.wait_job(job_id, lambda j: j["download_state"] == "Success", timeout=15)
    assert job["s3_key"] == key
    assert await object_keys(moto, bucket) == [key]
    assert await get_object(moto, bucket, key) == (data, "text/plain")
    types = [e["type"] for e in await api.events(job_id)]
    assert types == [
        "job.accepted",
        "download.started",
        "download.requeued",
        "download.started",
        "download.succeeded",
    ]


async def test_processor_without_s3_fails_a_bucket_job_clearly(
    service_factory: ServiceFactory, moto: MotoServer, bucket: str, files: FileServer
) -> None:
    """A processor whose config lacks s3.enabled fails a job naming a bucket, saying why,
    without downloading it first."""
    api = await service_factory({"s3": moto.settings()}, {"api"})
    job_id = await api.submit(**s3_job(files.add("/n.txt", b"n"), bucket, max_retries=2))
    await service_factory(None, {"processor"})
    job = await api.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert job["error"] == "S3 storage is not enabled on this processor (s3.enabled)"
    assert job["download_attempts"] == 1
    assert files.count("/n.txt") == 0  # refused before downloading


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials from this machine: no AWS_* variables, no ~/.aws files, no IMDS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_processor_process_configured_by_environment_uses_aws_env_credentials(
    service_factory: ServiceFactory,
    make_config: Callable[..., tuple[Path, Any]],
    spawn: Callable[..., Any],
    moto: MotoServer,
    bucket: str,
    files: FileServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A real `downloader processor` process with S3 set by DOWNLOADER__S3__* only and the
    keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (boto3's default chain) uploads a job
    and stops cleanly."""
    api = await service_factory({"s3": moto.settings()}, {"api"})
    config_path, _ = make_config(name="processor.json")  # no s3 section in the file
    isolate_aws_env(monkeypatch, tmp_path)
    env = {
        "DOWNLOADER__S3__ENABLED": "true",
        "DOWNLOADER__S3__ENDPOINT_URL": moto.endpoint,
        "DOWNLOADER__S3__ADDRESSING_STYLE": "path",
        "DOWNLOADER__S3__KEY_PREFIX": "env/",
        "AWS_ACCESS_KEY_ID": "from-env",
        "AWS_SECRET_ACCESS_KEY": "from-env-secret",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc = spawn("processor", config_path)
    data = b"from a real processor process\n"
    job_id = await api.submit(**s3_job(files.add("/p.txt", data), bucket))
    ended = ("Success", "Failed")
    job = await api.wait_job(job_id, lambda j: j["download_state"] in ended, timeout=20)
    assert job["download_state"] == "Success", (job, proc.log())
    assert await get_object(moto, bucket, f"env/{job_id}") == (data, "text/plain")
    assert await asyncio.to_thread(proc.terminate) == 0


async def test_no_credentials_anywhere_fails_the_job_saying_so(
    service_factory: ServiceFactory,
    moto: MotoServer,
    bucket: str,
    files: FileServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Without keys in the config and none in boto3's default chain, the job fails at once
    with a sentence saying there are no usable AWS credentials."""
    isolate_aws_env(monkeypatch, tmp_path)
    settings = moto.settings(access_key_id=None, secret_access_key=None)
    svc = await service_factory({"s3": settings}, {"api", "processor"})
    job_id = await svc.submit(**s3_job(files.add("/c.txt", b"c"), bucket, max_retries=2))
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert job["error"].startswith("S3 upload failed: no usable AWS credentials"), job
    assert job["download_attempts"] == 1


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (ClientError({"Error": {"Code": "NoSuchBucket"}}, "PutObject"), PermanentError, "exist"),
        (
            ClientError(
                {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                "PutObject",
            ),
            PermanentError,
            "denied",
        ),
        (
            ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                "UploadPart",
            ),
            TransientError,
            "SlowDown",
        ),
        (
            ClientError(
                {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}},
                "PutObject",
            ),
            TransientError,
            "InternalError",
        ),
        (
            ClientError(
                {"Error": {"Code": "EntityTooLarge"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                "PutObject",
            ),
            PermanentError,
            "EntityTooLarge",
        ),
        (EndpointConnectionError(endpoint_url="http://s3.test"), TransientError, "s3.test"),
        (NoCredentialsError(), PermanentError, "credentials"),
    ],
)
def test_s3_errors_are_sorted_into_retriable_and_not(
    exc: Exception, kind: type[Exception], words: str
) -> None:
    """Network errors, 5xx and throttling are retried; missing buckets, refused access, bad
    credentials and other 4xx are not. Every sentence starts `S3 upload failed`."""
    err = classify_s3_error(exc, "media")
    assert type(err) is kind
    assert str(err).startswith("S3 upload failed: ") and words in str(err)


# -- validation -------------------------------------------------------------------------------


@pytest.fixture
async def s3_api(service_factory: ServiceFactory, moto: MotoServer) -> Service:
    """The API alone, S3 enabled for two buckets."""
    patch = {"s3": moto.settings(allowed_buckets=["good-bucket", "media.example.com"])}
    return await service_factory(patch, {"api"})  # type: ignore[no-any-return]


def base(**fields: Any) -> dict[str, Any]:
    return {"aggr_id": "v", "aggr_limit": 1, "url": "http://origin.test/a", **fields}


BAD = [
    *(
        pytest.param(base(s3_bucket=name, s3_region=REGION), "s3_bucket", id=f"bucket-{name}")
        for name in (
            "ab",
            "a" * 64,
            "Upper-case",
            "under_score",
            "-leading-hyphen",
            "trailing-hyphen-",
            "trailing-dot.",
            "two..dots",
            "dash-.dot",
            "192.168.1.10",
            "xn--punycode",
            "name-s3alias",
            "with space",
            "slash/inside",
            "évian",
            "",
        )
    ),
    pytest.param(base(s3_bucket=5, s3_region=REGION), "s3_bucket", id="bucket-int"),
    *(
        pytest.param(base(s3_bucket="good-bucket", s3_region=r), "s3_region", id=f"region-{r}")
        for r in (
            "EU-WEST-1",
            "eu_west_1",
            "eu-west-1.evil.test",
            "eu--west-1",
            "-eu-west-1",
            "eu-west-1-",
            "1eu",
            "a" * 33,
            "",
        )
    ),
    pytest.param(base(s3_bucket="good-bucket", s3_region=1), "s3_region", id="region-int"),
    pytest.param(base(s3_region=REGION), "s3_bucket", id="region-without-bucket"),
    pytest.param(base(s3_bucket="good-bucket"), "s3_region", id="bucket-without-region"),
    pytest.param(
        base(s3_bucket="other-bucket", s3_region=REGION), "s3_bucket", id="bucket-not-allowed"
    ),
    pytest.param(base(), "callback", id="neither-callback-nor-bucket"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
async def test_invalid_s3_fields_are_400_naming_the_field_and_store_nothing(
    s3_api: Service, redis_client: StrRedis, body: dict[str, Any], field: str
) -> None:
    """A bad s3_bucket or s3_region answers 400 naming the field, and Redis stays untouched."""
    status, answer = await s3_api.post("/download", body)
    assert status == 400, answer
    assert field in answer["error"], answer
    assert await data_keys(redis_client) == []


@pytest.mark.parametrize("callback", [False, True], ids=["no-callback", "with-callback"])
async def test_bucket_on_a_service_without_s3_is_400(
    service_factory: ServiceFactory, redis_client: StrRedis, callback: bool
) -> None:
    """With s3.enabled false (the default) a job naming a bucket is refused, naming s3_bucket."""
    api = await service_factory(None, {"api"})
    extra = {"callback_type": "http", "callback_dst": "http://cb.test/x"} if callback else {}
    status, answer = await api.post(
        "/download", base(s3_bucket="good-bucket", s3_region=REGION, **extra)
    )
    assert status == 400, answer
    assert answer["field"] == "s3_bucket"
    assert answer["error"] == "s3_bucket: S3 storage is not enabled on this service"
    assert await data_keys(redis_client) == []


@pytest.mark.parametrize("name", ["good-bucket", "media.example.com"])
async def test_allowed_bucket_without_callback_is_accepted(
    s3_api: Service, redis_client: StrRedis, name: str
) -> None:
    """A listed bucket with a valid region and no callback is accepted (201) and stored."""
    job_id = await s3_api.submit(**base(s3_bucket=name, s3_region="us-gov-west-1"))
    job = await s3_api.job(job_id)
    assert (job["s3_bucket"], job["s3_region"], job["callback_state"]) == (
        name,
        "us-gov-west-1",
        "NotRequested",
    )


async def test_aborting_a_job_without_callback_queues_no_callback(
    s3_api: Service, redis_client: StrRedis
) -> None:
    """DELETE /jobs/{id} of a job without a callback fails it, queues nothing, and settles it."""
    job_id = await s3_api.submit(**base(s3_bucket="good-bucket", s3_region=REGION))
    status, answer = await s3_api.http_delete(f"/jobs/{job_id}")
    assert status == 200, answer
    job = await s3_api.job(job_id)
    assert (job["download_state"], job["callback_state"]) == ("Failed", "NotRequested")
    assert await callbacks_queued(redis_client, s3_api) == 0
    assert await redis_client.pttl(s3_api.storage.keys.done(job_id)) > 0


async def test_aborting_a_job_mid_upload_stops_the_upload_and_keeps_nothing(
    service_factory: ServiceFactory,
    moto: MotoServer,
    moto_relay: TcpRelay,
    bucket: str,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """DELETE /jobs/{id} while a multipart upload is stalled: the job fails as aborted at once
    (callback "Aborted: ..."), its temp file is gone, and once S3 answers again the transfer
    stops at its next part and aborts the multipart upload: no object, no parts left."""
    settings = moto.settings(
        endpoint_url=f"http://127.0.0.1:{moto_relay.port}", read_timeout_seconds=30
    )
    svc = await service_factory({"s3": settings})
    moto_relay.hold()
    body = os.urandom(20 * 1024 * 1024)  # multipart: 8 MiB parts
    job_id = await svc.submit(
        **s3_job(files.add("/abort.bin", body), bucket, callback_url=receiver.url("/cb"))
    )
    await until(lambda: moto_relay.received > 0)  # the upload has begun: S3 hears nothing back
    status, answer = await svc.http_delete(f"/jobs/{job_id}")
    assert status == 200, answer
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False and cb["error"].startswith("Aborted"), cb
    await until(lambda: not list((Path(svc.config.processor.storage_dir) / ".tmp").iterdir()))

    moto_relay.release()
    # the transfer stops at its next part and aborts the multipart upload it had begun
    await until(
        lambda: any(r.startswith("DELETE") and "uploadId=" in r for r in moto_relay.requests)
    )
    for _ in range(100):  # that DELETE may still be on its way through the relay
        left = await asyncio.to_thread(moto.client().list_multipart_uploads, Bucket=bucket)
        if not left.get("Uploads"):
            break
        await asyncio.sleep(0.05)
    assert not left.get("Uploads"), left
    assert not any(r.startswith("POST") and "uploadId=" in r for r in moto_relay.requests)
    assert await object_keys(moto, bucket) == []
    job = await svc.job(job_id)
    assert (job["download_state"], job["file_state"]) == ("Failed", "none")
