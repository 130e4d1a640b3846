"""Downloads end to end: a real origin server, the service, a real callback receiver."""

from __future__ import annotations

import os
from pathlib import Path

from harness.servers import CallbackReceiver, FileServer, Reply, job_request
from tests.conftest import Service
from tests.images import gif, jpeg, png


def job_body(files_url: str, receiver: CallbackReceiver, **extra: object) -> dict[str, object]:
    return job_request(files_url, receiver.url("/cb"), **{"aggr_id": "a1", **extra})


async def test_success_echoes_extra_and_stores_identical_bytes(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A successful download calls back with extra echoed and stores the exact bytes."""
    body = png(7, 9) + b"\x00" * 50_000
    job_id = await service.submit(**job_body(files.add("/a.png", body), receiver, extra="foobar"))
    [cb] = await receiver.wait_for(job_id)
    assert cb == {
        "success": True,
        "error": "",
        "extra": "foobar",
        "resource_url": files.url("/a.png"),
        "download_url": f"http://files.test/dl/{job_id[:3]}/{job_id}",
        "job_id": job_id,
        "response_code": 200,
        "delivered": True,
        "delivery_error": "",
        "image_size": "",
        "_status": 200,
    }
    stored = Path(service.config.processor.storage_dir) / job_id[:3] / job_id
    assert stored.read_bytes() == body


async def test_404_fails_without_retry(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A 404 is not retriable: one request, a failure callback with the status."""
    job_id = await service.submit(**job_body(files.url("/missing"), receiver))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False
    assert cb["error"] == "Received status code 404"
    assert cb["response_code"] == 404
    assert cb["download_url"] == ""
    assert files.count("/missing") == 1


async def test_mime_mismatch_negation_and_globs(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Mime patterns: a glob passes, a negation fails, a mismatch names both types."""
    url = files.add("/p.png", png(3, 3))
    ok = await service.submit(**job_body(url, receiver, mime_type="image/*"))
    negated = await service.submit(**job_body(url, receiver, mime_type="!image/png"))
    mismatch = await service.submit(**job_body(url, receiver, mime_type="image/jpeg"))
    both = await service.submit(**job_body(url, receiver, mime_type="!image/gif, image/*"))
    assert (await receiver.wait_for(ok))[0]["success"] is True
    assert (await receiver.wait_for(both))[0]["success"] is True
    [neg] = await receiver.wait_for(negated)
    assert (
        neg["success"] is False
        and neg["error"] == "Expected mime-type to be (!image/png), found (image/png)"
    )
    [mis] = await receiver.wait_for(mismatch)
    assert mis["success"] is False
    assert mis["error"] == "Expected mime-type to be (image/jpeg), found (image/png)"
    assert mis["response_code"] == 200
    assert files.count("/p.png") == 4  # a mime mismatch is not retried


async def test_empty_body_is_application_x_empty(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """An empty body sniffs as application/x-empty."""
    job_id = await service.submit(
        **job_body(files.add("/empty", b""), receiver, mime_type="image/*")
    )
    [cb] = await receiver.wait_for(job_id)
    assert cb["error"] == "Expected mime-type to be (image/*), found (application/x-empty)"


async def test_image_size_png_jpeg_gif_and_non_image(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """extract_image_size gives WxH for png, jpeg and gif; a text file succeeds with no size."""
    cases = {
        "/i.png": (png(10, 20), "10x20"),
        "/i.jpg": (jpeg(640, 480), "640x480"),
        "/i.gif": (gif(3, 5), "3x5"),
        "/t.txt": (b"hello world\n" * 10, ""),
    }
    ids = {}
    for path, (body, _size) in cases.items():
        ids[path] = await service.submit(
            **job_body(files.add(path, body), receiver, extract_image_size=True)
        )
    for path, (_body, size) in cases.items():
        [cb] = await receiver.wait_for(ids[path])
        assert cb["success"] is True, cb
        assert cb["image_size"] == size


async def test_bad_image_fails_permanently(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A JPEG whose header has no frame size is a bad image: failed, not retried."""
    broken = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 40
    job_id = await service.submit(
        **job_body(files.add("/bad.jpg", broken), receiver, extract_image_size=True)
    )
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False and "Bad image" in cb["error"]
    assert files.count("/bad.jpg") == 1


async def test_500_then_503_then_success(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """5xx answers are retried with backoff until one succeeds."""
    url = files.add("/flaky", Reply(b"", 500), Reply(b"", 503), Reply(b"finally"))
    job_id = await service.submit(**job_body(url, receiver))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True
    assert files.count("/flaky") == 3
    job = await service.job(job_id)
    assert job["download_attempts"] == 3


async def test_max_retries_zero_and_one_make_exact_request_counts(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """max_retries=0 makes one request, max_retries=1 two; then the job fails, last status."""
    zero = await service.submit(
        **job_body(files.add("/z", Reply(b"", 500)), receiver, max_retries=0)
    )
    one = await service.submit(
        **job_body(files.add("/o", Reply(b"", 502)), receiver, max_retries=1)
    )
    [cz] = await receiver.wait_for(zero)
    [co] = await receiver.wait_for(one)
    assert (files.count("/z"), files.count("/o")) == (1, 2)
    assert cz["response_code"] == 500 and co["response_code"] == 502
    assert co["error"] == "Received status code 502"


async def test_body_shorter_than_content_length_is_retried(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A body cut short of its Content-Length is retriable and never stored."""
    url = files.add("/short", Reply(b"x" * 1000, truncate_to=100))
    job_id = await service.submit(**job_body(url, receiver, max_retries=1))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False
    assert files.count("/short") == 2
    assert not (Path(service.config.processor.storage_dir) / job_id[:3] / job_id).exists()


async def test_default_and_per_job_request_headers(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Per-job headers override the defaults by name (any case); defaults not named still go."""
    url = files.add("/h", b"ok")
    job_id = await service.submit(
        **job_body(url, receiver, request_headers={"user-agent": "Custom/1", "X-Count": 7})
    )
    await receiver.wait_for(job_id)
    [headers] = files.requests["/h"]
    assert headers["User-Agent"] == "Custom/1"
    assert headers["X-Count"] == "7"
    assert headers["X-Default"] == "d"


async def test_aggregation_proxy_is_used(
    service: Service, files: FileServer, receiver: CallbackReceiver, proxy: object
) -> None:
    """Downloads of an aggregation with aggr_proxy go through that proxy."""
    from harness.servers import ForwardProxy

    assert isinstance(proxy, ForwardProxy)
    url = files.add("/via", b"proxied")
    job_id = await service.submit(**job_body(url, receiver, aggr_id="px", aggr_proxy=proxy.url("")))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True
    assert proxy.seen == [url]
    assert files.requests["/via"][0]["X-Via-Proxy"] == "1"


async def test_download_timeout_trips_on_a_stalled_body(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A body that stalls is cut off by download_timeout (retriable); meanwhile other
    aggregations' jobs go through."""
    url = files.add("/stall", Reply(b"y" * 5000, stall_after=10))
    job_id = await service.submit(**job_body(url, receiver, download_timeout=1, max_retries=0))
    other = await service.submit(**job_body(files.add("/ok", b"fine"), receiver, aggr_id="other"))
    [ok] = await receiver.wait_for(other, timeout=10)
    assert ok["success"] is True
    assert receiver.for_job(job_id) == []  # the stalled one is still waiting for its timeout
    [cb] = await receiver.wait_for(job_id, timeout=10)
    assert cb["success"] is False and "timed out" in cb["error"]


async def test_failures_after_the_body_started_leave_no_temp_file(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A mime mismatch, a bad image and a short body each fail with nothing left in .tmp."""
    broken = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 40
    jobs = [
        await service.submit(
            **job_body(files.add("/m.png", png(4, 4)), receiver, mime_type="image/gif")
        ),
        await service.submit(
            **job_body(files.add("/b.jpg", broken), receiver, extract_image_size=True)
        ),
        await service.submit(
            **job_body(files.add("/s", Reply(b"y" * 5000, truncate_to=10)), receiver, max_retries=0)
        ),
    ]
    for job_id in jobs:
        [cb] = await receiver.wait_for(job_id)
        assert cb["success"] is False
    tmp = Path(service.config.processor.storage_dir) / ".tmp"
    assert list(tmp.iterdir()) == []


async def test_a_multi_megabyte_body_is_stored_byte_identical(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A body too large to be read whole (the streaming path, chunk by chunk) is stored
    exactly."""
    body = os.urandom(3 * 1024 * 1024 + 12_345)
    job_id = await service.submit(**job_body(files.add("/big.bin", body), receiver))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True
    stored = Path(service.config.processor.storage_dir) / job_id[:3] / job_id
    assert stored.read_bytes() == body
