"""Processor behaviour that needs no second process: leases, disk health, file reaping."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from downloader.ids import shard_of
from downloader.processor import HAND_ON_CHAIN
from harness.servers import CallbackReceiver, FileServer, free_port, job_request, until
from tests.conftest import Service


class SlowOrigin:
    """An origin that sends its body in slices over `seconds`."""

    def __init__(self, body: bytes, seconds: float) -> None:
        self.body, self.seconds, self.requests = body, seconds, 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        resp = web.StreamResponse()
        resp.content_length = len(self.body)
        await resp.prepare(request)
        step = len(self.body) // 10
        for i in range(10):
            await resp.write(self.body[i * step : (i + 1) * step if i < 9 else None])
            await asyncio.sleep(self.seconds / 10)
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/slow", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/slow"


def body(url: str, receiver: CallbackReceiver, **extra: Any) -> dict[str, Any]:
    return job_request(url, receiver.url("/cb"), **{"aggr_id": "p", "aggr_limit": 2, **extra})


async def test_a_download_longer_than_its_lease_keeps_it(
    service: Service, receiver: CallbackReceiver
) -> None:
    """The lease (1 s in tests) is renewed while a 2.5 s download runs: no requeue, one attempt."""
    origin = SlowOrigin(b"z" * 100_000, 2.5)
    try:
        job_id = await service.submit(**body(await origin.start(), receiver))
        [cb] = await receiver.wait_for(job_id, timeout=15)
        assert cb["success"] is True
        _, events = await service.get(f"/jobs/{job_id}/events")
        types = [e["type"] for e in events["events"]]
        assert "download.requeued" not in types
        assert types.count("download.started") == 1
        assert origin.requests == 1
    finally:
        await origin.runner.cleanup()


async def test_a_full_disk_pauses_the_processor_and_room_resumes_it(
    service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Over disk_pause_percent no job is taken; a processor with room takes the waiting job."""
    full = await service_factory(
        {"processor": {"disk_pause_percent": 0.001, "disk_resume_percent": 0.0005}},
        {"api", "processor", "notifier"},
    )
    for _ in range(100):
        _, stats = await full.get("/stats/processor")
        if stats.get("paused") == 1:
            break
        await asyncio.sleep(0.05)  # the stats publication is periodic (100 ms)
    assert stats["paused"] == 1
    job_id = await full.submit(**body(files.add("/f", b"data"), receiver))
    await asyncio.sleep(0.5)  # give a (wrongly) working processor time to take it
    assert (await full.job(job_id))["download_state"] == "Pending"
    assert files.count("/f") == 0
    await service_factory(None, {"processor"})  # a processor whose disk has room
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True


async def test_delivered_files_are_deleted_after_the_interval(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """deletion_interval (300 ms in tests) after the callback, the file is gone: file.deleted."""
    job_id = await service.submit(**body(files.add("/d", b"delete me"), receiver))
    await receiver.wait_for(job_id)
    path = Path(service.config.processor.storage_dir) / job_id[:3] / job_id
    job = await service.wait_job(job_id, lambda j: j["file_state"] == "deleted")
    assert not path.exists()
    assert job["download_url"].endswith(job_id)


async def test_aggregation_limit_is_respected_within_one_processor(
    service: Service, receiver: CallbackReceiver
) -> None:
    """aggr_limit 2 with 6 slow jobs: never more than 2 downloads in flight."""
    in_flight = 0
    peak = 0

    async def handle(_request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.1)
        in_flight -= 1
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_get("/c", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        ids = [
            await service.submit(**body(f"http://127.0.0.1:{port}/c", receiver)) for _ in range(6)
        ]
        for job_id in ids:
            await receiver.wait_for(job_id)
        assert peak == 2
    finally:
        await runner.cleanup()


async def test_stale_temp_files_of_dead_processors_are_swept(
    make_config: Any, service_factory: Any
) -> None:
    """On start a processor removes temp files older than any download may last, not fresh ones."""
    import os
    import time

    _path, config = make_config()
    tmp = Path(config.processor.storage_dir) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stale, fresh = tmp / "dead.job.owner1", tmp / "live.job.owner2"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    old = time.time() - config.processor.download_timeout_seconds - 3600
    os.utime(stale, (old, old))
    await service_factory(None, {"processor"})
    for _ in range(100):  # the sweep runs as the processor starts
        if not stale.exists():
            break
        await asyncio.sleep(0.02)
    assert not stale.exists()
    assert fresh.exists()


async def test_file_of_a_failed_callback_goes_with_its_job(
    service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A callback that failed for good keeps its file for a /retry, until the job expires."""
    svc = await service_factory({"events": {"retention_hours": 0.0002}})  # 720 ms
    receiver.statuses = [500]
    job_id = await svc.submit(**body(files.add("/kept", b"keep me"), receiver))
    await svc.wait_job(job_id, lambda j: j["callback_state"] == "Failed")
    path = Path(svc.config.processor.storage_dir) / job_id[:3] / job_id
    assert path.exists()
    for _ in range(150):  # deleted by the processor's reaper once the retention has passed
        if not path.exists():
            break
        await asyncio.sleep(0.02)
    assert not path.exists()


async def test_a_handed_on_slot_does_not_starve_other_aggregations(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """A finishing download hands its slot to the next job of its aggregation only while this
    processor has workers to spare: with max_workers 2 and a 10-job backlog in one aggregation,
    a job of another aggregation gets the next free worker instead of waiting for the backlog."""
    service = await service_factory({"processor": {"max_workers": 2}})
    origin = SlowOrigin(b"s" * 10_000, 0.2)
    url = await origin.start()
    try:
        busy = [
            await service.submit(**body(url, receiver, aggr_id="busy", aggr_limit=10))
            for _ in range(10)
        ]
        await until(lambda: origin.requests >= 2)
        other = await service.submit(**body(url, receiver, aggr_id="other"))
        await receiver.wait_total(11, timeout=15)
        events = await service.all_events()
        started = [f["job_id"] for _id, f in events if f["type"] == "download.started"]
        assert started.index(other) <= 3, f"{started.index(other)} busy jobs went first"
        assert set(started) == {*busy, other}
    finally:
        await origin.runner.cleanup()


async def test_a_slot_is_handed_on_at_most_hand_on_chain_times_in_a_row(
    service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """One processor, one aggregation with a single slot, 20 jobs queued before it starts: each
    finish hands the slot to the next job, except every HAND_ON_CHAIN + 1-th, which frees it
    through a wake so other processors get their turn; and the last, with nothing left."""
    api = await service_factory(roles={"api", "notifier"})
    url = files.add("/chain.txt", b"chained")
    ids = [
        await api.submit(**body(url, receiver, aggr_id="chain", aggr_limit=1)) for _ in range(20)
    ]
    wakes_before = await api.wakes()
    await service_factory(roles={"processor"})
    await receiver.wait_total(20, timeout=15)
    finish_wakes = await api.wakes() - wakes_before
    runs = [HAND_ON_CHAIN + 1] * (20 // (HAND_ON_CHAIN + 1)) + [20 % (HAND_ON_CHAIN + 1)]
    assert finish_wakes == len([r for r in runs if r]), (finish_wakes, runs)
    assert {p["job_id"] for p in receiver.received} == set(ids)


async def test_a_file_the_reaper_cannot_delete_is_logged_and_retried_later(
    service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A disk error while reaping is not a Redis outage: the reaper keeps that file due for a
    later try and goes on reaping other files."""
    # 0.6 s from a delivered callback to the file's deletion: time to make it undeletable
    svc = await service_factory({"notifier": {"deletion_interval": 0.01}})
    assert svc.processor is not None
    store = svc.processor.store
    stuck = await svc.submit(**job_request(files.add("/a", b"a"), receiver.url("/cb")))
    await receiver.wait_for(stuck)
    await svc.wait_job(stuck, lambda j: j["callback_state"] == "Success")
    # make its file undeletable by unlink(): a directory with something inside
    path = store.path(stuck)
    if path.exists():
        path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")
    fine = await svc.submit(**job_request(files.add("/b", b"b"), receiver.url("/cb")))
    await svc.wait_job(fine, lambda j: j["file_state"] == "deleted")
    job = await svc.job(stuck)
    assert job["file_state"] == "stored"
    due = await svc.storage.r.zscore(svc.storage.keys.reap(shard_of(stuck)), stuck)
    assert due is not None  # still due, later
    assert path.is_dir()
