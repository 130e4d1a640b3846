"""Slow origins cannot take a processor: one aggregation holds at most its share of workers,
and downloads that stall or trickle are cut off (processor.read_idle_timeout_seconds,
processor.min_bytes_per_second)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from downloader.config import Config
from harness.servers import FileServer, Reply, until
from tests.conftest import Service

ServiceFactory = Callable[..., Awaitable[Service]]
NO_CALLBACK = "http://callback.test/cb"  # never called: these tests run no notifier
ENDED = ("download.succeeded", "download.failed", "download.retry_scheduled")


def job(url: str, aggr_id: str, **extra: Any) -> dict[str, Any]:
    return {"aggr_id": aggr_id, "aggr_limit": 20, "url": url, "callback_url": NO_CALLBACK, **extra}


class TrickleOrigin:
    """Sends one byte every `interval_s` until `release` is set, then the rest at once; counts
    the requests in flight and their peak."""

    def __init__(self, interval_s: float, size: int = 100) -> None:
        self.interval_s = interval_s
        self.size = size
        self.release = asyncio.Event()
        self.in_flight = 0
        self.peak = 0
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            resp = web.StreamResponse()
            resp.content_length = self.size
            await resp.prepare(request)
            sent = 0
            while not self.release.is_set() and sent < self.size - 1:
                await resp.write(b"t")
                sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.interval_s)
            await resp.write(b"t" * (self.size - sent))
            return resp
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def event_types(svc: Service) -> list[tuple[str, str]]:
    """(job id, type) of every event so far, in order."""
    return [(fields["job_id"], fields["type"]) for _id, fields in await svc.all_events()]


async def test_one_aggregation_of_slow_downloads_leaves_workers_for_another(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """With max_workers 4, eight 1-byte-per-second downloads of aggregation A (aggr_limit 20)
    hold at most 2 workers (half, the default cap), so a job of aggregation B submitted after
    them succeeds while all of A's are still running."""
    svc = await service_factory(
        {"processor": {"max_workers": 4, "min_bytes_per_second": 0}}, {"api", "processor"}
    )
    assert svc.config.processor.aggregation_workers == 2
    slow = TrickleOrigin(interval_s=1.0)
    async with serving(slow.handle) as base:
        a_jobs = [await svc.submit(**job(f"{base}/a{i}", "A")) for i in range(8)]
        await until(lambda: slow.in_flight >= 2)  # A's share is claimed and downloading
        b_job = await svc.submit(**job(files.add("/b", b"fast"), "B"))
        await svc.wait_job(b_job, lambda j: j["download_state"] == "Success")
        assert slow.in_flight == 2 and slow.requests == 2  # A is still on its first two
        slow.release.set()
        for job_id in a_jobs:
            await svc.wait_job(job_id, lambda j: j["download_state"] == "Success", timeout=20)
    events = await event_types(svc)
    b_done = events.index((b_job, "download.succeeded"))
    a_ends = [i for i, (job_id, kind) in enumerate(events) if job_id in a_jobs and kind in ENDED]
    assert b_done < min(a_ends)
    assert slow.peak == 2  # never more than the cap, handed-on slots included


async def test_a_configured_cap_bounds_an_aggregation_below_its_limit(
    service_factory: ServiceFactory,
) -> None:
    """processor.max_workers_per_aggregation: 1 runs one download of an aggregation at a time
    on this processor even though aggr_limit allows 20."""
    svc = await service_factory(
        {"processor": {"max_workers": 4, "max_workers_per_aggregation": 1}}, {"api", "processor"}
    )
    slow = TrickleOrigin(interval_s=0.01, size=20)
    async with serving(slow.handle) as base:
        ids = [await svc.submit(**job(f"{base}/c{i}", "C")) for i in range(5)]
        for job_id in ids:
            await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")
    assert slow.peak == 1 and slow.requests == 5


@pytest.mark.parametrize(
    ("max_workers", "per_aggregation", "cap"),
    [(256, None, 128), (4, None, 2), (1, None, 1), (4, 1, 1), (4, 9, 4)],
)
def test_the_per_aggregation_cap_defaults_to_half_of_the_workers(
    max_workers: int, per_aggregation: int | None, cap: int
) -> None:
    """Unset, the cap is half of max_workers (at least 1); set, it is never above max_workers."""
    processor = {"max_workers": max_workers, "max_workers_per_aggregation": per_aggregation}
    assert Config.model_validate({"processor": processor}).processor.aggregation_workers == cap


def test_the_new_processor_limits_are_checked_by_name() -> None:
    """A cap of 0 or a negative throughput is refused at start-up, naming the key."""
    for key, bad in (("max_workers_per_aggregation", 0), ("min_bytes_per_second", -1)):
        with pytest.raises(ValidationError, match=key):
            Config.model_validate({"processor": {key: bad}})


THROUGHPUT = {
    "processor": {
        "min_bytes_per_second": 1000,
        "min_throughput_window_seconds": 0.3,
        "read_idle_timeout_seconds": 10,
    }
}


@pytest.mark.parametrize("size", [10_000, 1_000_000])  # read whole, and streamed to disk
async def test_a_trickling_origin_fails_by_the_minimum_throughput(
    service_factory: ServiceFactory, size: int
) -> None:
    """An origin sending 50 bytes a second fails once the window has passed, as a transient
    error (retried) that says how much it sent."""
    svc = await service_factory(THROUGHPUT, {"api", "processor"})
    trickle = TrickleOrigin(interval_s=0.02, size=size)
    async with serving(trickle.handle) as base:
        job_id = await svc.submit(**job(f"{base}/t", "T", max_retries=1))
        failure = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert failure["download_attempts"] == 2
    error = failure["error"]
    assert error.startswith("the origin sent ") and "below the minimum of 1000 B/s" in error


async def test_an_origin_that_never_answers_fails_by_the_minimum_throughput(
    service_factory: ServiceFactory,
) -> None:
    """An origin that keeps the request waiting for its headers past the window has sent 0
    bytes: the download fails by the same rule."""

    async def silent(_request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    svc = await service_factory(THROUGHPUT, {"api", "processor"})
    async with serving(silent) as base:
        job_id = await svc.submit(**job(f"{base}/s", "S", max_retries=0))
        failure = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert re.fullmatch(
        r"the origin sent 0 bytes in [\d.]+ s, below the minimum of 1000 B/s", failure["error"]
    ), failure["error"]


async def test_a_stalled_body_fails_by_the_idle_read_timeout(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """A body that stops arriving fails after processor.read_idle_timeout_seconds, as a
    transient error, long before download_timeout."""
    svc = await service_factory(
        {"processor": {"read_idle_timeout_seconds": 0.3, "min_bytes_per_second": 0}},
        {"api", "processor"},
    )
    url = files.add("/stall", Reply(b"s" * 5000, stall_after=10))
    job_id = await svc.submit(**job(url, "I", max_retries=1))
    failure = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert failure["error"] == "the origin sent nothing for 0.3 s"
    assert failure["download_attempts"] == 2
    assert files.count("/stall") == 2
