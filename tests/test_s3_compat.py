"""S3 as the original used it, against a real S3-compatible server (moto): the whole file store
in one bucket (`processor.filestorage` type `s3`), reaped like local files; and a job's `extra`
as the user metadata of the object in its own bucket, checked at POST as header material."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.moto_server import REGION, MotoServer, get_object, object_keys
from harness.redis_nodes import StrRedis
from harness.servers import (
    CallbackReceiver,
    FileServer,
    HoldingReceiver,
    Reply,
    TcpRelay,
    job_request,
    until,
)
from tests.conftest import Service

ServiceFactory = Callable[..., Any]


def bucket_store(bucket: str) -> dict[str, Any]:
    return {"filestorage": {"type": "s3", "region": REGION, "bucket": bucket}}


def local_files(service: Service) -> list[Path]:
    """Every file under processor.storage_dir (temporary ones included)."""
    return [p for p in Path(service.config.processor.storage_dir).rglob("*") if p.is_file()]


# -- the file store in one bucket -------------------------------------------------------------


async def test_s3_filestorage_stores_every_job_in_the_bucket_and_reaps_it(
    service_factory: ServiceFactory,
    moto: MotoServer,
    bucket: str,
    files: FileServer,
    holding: HoldingReceiver,
) -> None:
    """With filestorage type s3, a job naming no bucket lands at `<id[0:3]>/<id>` in the
    configured bucket (download_url = processor.download_url + that path), nothing stays on
    local disk, and deletion_interval after the callback the object is deleted."""
    svc = await service_factory(
        {"processor": bucket_store(bucket), "s3": moto.settings(enabled=False)}
    )
    data = b"one bucket for every job\n"
    job_id = await svc.submit(**job_request(files.add("/a.txt", data), holding.url("/cb")))
    key = f"{job_id[:3]}/{job_id}"
    await holding.wait(lambda: job_id in holding.first, timeout_s=30)
    # the callback is held unanswered: the object's deletion has not begun
    payload = holding.first[job_id]
    assert payload["success"] is True, payload
    assert payload["download_url"] == f"http://files.test/dl/{key}"
    assert await get_object(moto, bucket, key) == (data, "text/plain")
    assert local_files(svc) == []

    holding.release.set()
    job = await svc.wait_job(job_id, lambda j: j["file_state"] == "deleted")
    assert await object_keys(moto, bucket) == []
    assert job["download_url"] == f"http://files.test/dl/{key}"
    assert "file.deleted" in [e["type"] for e in await svc.events(job_id)]


async def test_s3_enabled_still_governs_only_a_jobs_own_bucket(
    service_factory: ServiceFactory, moto: MotoServer, bucket: str
) -> None:
    """The bucket file store uses the s3 section's endpoint and keys without s3.enabled, and a
    job naming its own bucket is still refused while s3.enabled is false."""
    svc = await service_factory(
        {"processor": bucket_store(bucket), "s3": moto.settings(enabled=False)}, {"api"}
    )
    status, answer = await svc.post(
        "/download",
        job_request("http://origin.test/a", "http://r.test/cb", s3_bucket=bucket, s3_region=REGION),
    )
    assert (status, answer["field"]) == (400, "s3_bucket"), answer


@pytest.mark.timeout(90)
async def test_a_stalled_bucket_holds_up_neither_retries_nor_its_own_deletions(
    service_factory: ServiceFactory,
    moto: MotoServer,
    moto_relay: TcpRelay,
    bucket: str,
    files: FileServer,
    holding: HoldingReceiver,
) -> None:
    """While the bucket stalls a deletion, download retries still come round (the reaper has
    a loop of its own); once the bucket answers, the object is deleted after all."""
    settings = moto.settings(
        enabled=False, endpoint_url=f"http://127.0.0.1:{moto_relay.port}", read_timeout_seconds=60
    )
    svc = await service_factory({"processor": bucket_store(bucket), "s3": settings})
    job_id = await svc.submit(**job_request(files.add("/a.txt", b"a\n"), holding.url("/cb")))
    # stored, and its deletion waits for the held callback's answer: stall the bucket first
    await holding.wait(lambda: job_id in holding.held, timeout_s=30)
    moto_relay.hold()
    holding.release.set()
    await until(lambda: any(r.startswith("DELETE ") for r in moto_relay.requests), timeout=20)

    failing = files.add("/broken", Reply(b"down", 503))
    other = await svc.submit(**job_request(failing, holding.url("/cb"), max_retries=2))
    done = await svc.wait_job(other, lambda j: j["download_state"] == "Failed")
    assert done["download_attempts"] == 3
    key = f"{job_id[:3]}/{job_id}"
    assert await object_keys(moto, bucket) == [key]
    assert (await svc.job(job_id))["file_state"] == "stored"

    moto_relay.release()
    await svc.wait_job(job_id, lambda j: j["file_state"] == "deleted")
    assert await object_keys(moto, bucket) == []


# -- extra as user metadata -------------------------------------------------------------------


async def object_metadata(server: MotoServer, bucket: str, key: str) -> dict[str, str]:
    head = await asyncio.to_thread(server.client().head_object, Bucket=bucket, Key=key)
    return dict(head["Metadata"])


@pytest.fixture
async def svc(service_factory: ServiceFactory, moto: MotoServer) -> Service:
    """The whole service with jobs' own buckets enabled against the module's moto server."""
    return await service_factory({"s3": moto.settings()})  # type: ignore[no-any-return]


async def test_extra_json_object_becomes_the_objects_user_metadata(
    svc: Service, moto: MotoServer, bucket: str, files: FileServer, receiver: CallbackReceiver
) -> None:
    """As the original: a JSON-object extra's strings, and its numbers as truncated integers,
    are the object's user metadata; other values are left out; the callback's extra is verbatim."""
    extra = '{"sku": "A-1", "count": 3, "ratio": 2.7, "neg": -2.5, "nested": {"x": 1}, "on": true}'
    job_id = await svc.submit(
        **job_request(
            files.add("/m.txt", b"meta\n"),
            receiver.url("/cb"),
            s3_bucket=bucket,
            s3_region=REGION,
            extra=extra,
        )
    )
    [payload] = await receiver.wait_for(job_id)
    assert (payload["success"], payload["extra"]) == (True, extra), payload
    metadata = await object_metadata(moto, bucket, job_id)
    assert metadata == {"sku": "A-1", "count": "3", "ratio": "2", "neg": "-2"}


@pytest.mark.parametrize("extra", ["plain words", "[1, 2]", '"a string"', ""])
async def test_extra_that_is_no_json_object_sends_no_metadata(
    svc: Service, moto: MotoServer, bucket: str, files: FileServer, extra: str
) -> None:
    """An extra that is not a JSON object is only passed back: the upload has no metadata."""
    url = files.add("/n.txt", b"no meta\n")
    job_id = await svc.submit(
        url=url, aggr_id="m", aggr_limit=2, s3_bucket=bucket, s3_region=REGION, extra=extra
    )
    await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")
    assert await object_metadata(moto, bucket, job_id) == {}


HOSTILE_EXTRA = [
    pytest.param('{"a\\r\\nx-amz-acl": "public-read"}', id="crlf-in-key"),
    pytest.param('{"a": "b\\r\\nx-amz-acl: public-read"}', id="crlf-in-value"),
    pytest.param('{"a": "b\\nc"}', id="lf-in-value"),
    pytest.param('{"a b": "c"}', id="space-in-key"),
    pytest.param('{"": "c"}', id="empty-key"),
    pytest.param('{"a": "caf\\u00e9"}', id="non-ascii-value"),
    pytest.param('{"k\\u00e9y": "v"}', id="non-ascii-key"),
    pytest.param('{"a": "' + "x" * 2048 + '"}', id="over-2KB"),
]


@pytest.mark.parametrize("extra", HOSTILE_EXTRA)
async def test_extra_that_cannot_be_header_material_is_refused_with_a_bucket(
    svc: Service, redis_client: StrRedis, bucket: str, extra: str
) -> None:
    """With s3_bucket, an extra whose keys or values could not travel as x-amz-meta-* headers
    (CR/LF, spaces, non-ASCII, over S3's 2 KB) is a 400 naming extra, and nothing is stored;
    without a bucket the same extra is only passed back, and accepted."""
    with_bucket = job_request(
        "http://origin.test/a", "http://r.test/cb", s3_bucket=bucket, s3_region=REGION, extra=extra
    )
    status, answer = await svc.post("/download", with_bucket)
    assert (status, answer["field"]) == (400, "extra"), answer
    assert answer["error"].startswith("extra cannot be the S3 object's user metadata")
    assert [k async for k in redis_client.scan_iter(match="dl:*:job:*")] == []

    status, answer = await svc.post(
        "/download", job_request("http://origin.test/a", "http://r.test/cb", extra=extra)
    )
    assert status == 201, answer
