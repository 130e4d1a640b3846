"""Job management: idempotent submission, abort, and the dashboard's failure list."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from downloader.ids import shard_of
from harness.servers import CallbackReceiver, FileServer, Reply, free_port, job_request
from tests.conftest import Service


def body(url: str, receiver: CallbackReceiver, **extra: Any) -> dict[str, Any]:
    return job_request(url, receiver.url("/cb"), **{"aggr_id": "j", "aggr_limit": 1, **extra})


class StallingOrigin:
    """Sends a few bytes then waits until released (or the connection is dropped)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 20_000
        await resp.prepare(request)
        await resp.write(b"s" * 10_000)
        self.started.set()
        await self.release.wait()
        await resp.write(b"s" * 10_000)
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/stall", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/stall"


async def test_same_idempotency_key_and_body_returns_the_same_job(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """A retried POST with the same Idempotency-Key and body gets the same id; no new job."""
    api = await service_factory(None, {"api"})
    request = body("http://origin.test/x", receiver)
    headers = {"Idempotency-Key": "order-42"}
    s1, first = await api.post("/download", request, headers=headers)
    s2, second = await api.post("/download", {**request}, headers=headers)
    assert (s1, s2) == (201, 201)
    assert first["id"] == second["id"]
    _, aggrs = await api.get("/dashboard/aggregations")
    assert aggrs == [{"name": "jobs:j", "size": 1}]


async def test_same_idempotency_key_with_another_body_is_refused(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """Reusing a key for a different request answers 422 naming the header, and queues nothing."""
    api = await service_factory(None, {"api"})
    headers = {"Idempotency-Key": "k-1"}
    s1, _ = await api.post("/download", body("http://origin.test/a", receiver), headers=headers)
    s2, err = await api.post("/download", body("http://origin.test/b", receiver), headers=headers)
    assert (s1, s2) == (201, 422)
    assert "Idempotency-Key" in err["error"]
    _, aggrs = await api.get("/dashboard/aggregations")
    assert aggrs == [{"name": "jobs:j", "size": 1}]


async def test_same_idempotency_key_for_an_aggregation_on_another_shard_is_refused(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """A key reused for a job of another aggregation, which lives in another shard, answers 422
    naming the header and the key's job, and queues nothing (keys are looked up in the shard of
    their aggregation, so the key is first tied to that shard)."""
    api = await service_factory(None, {"api"})
    headers = {"Idempotency-Key": "k-2"}
    _, first = await api.post("/download", body("http://origin.test/a", receiver), headers=headers)
    other = await api.submit(**body("http://origin.test/o", receiver, aggr_id="other"))
    assert shard_of(other) != shard_of(first["id"])  # placed beside the waiting aggregation
    request = body("http://origin.test/b", receiver, aggr_id="other")
    status, err = await api.post("/download", request, headers=headers)
    assert status == 422, err
    assert err["field"] == "Idempotency-Key" and first["id"] in err["error"]
    _, aggrs = await api.get("/dashboard/aggregations")
    assert sorted(a["size"] for a in aggrs) == [1, 1]


async def test_idempotency_key_expires_after_the_window(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """After api.idempotency_window_seconds the same key creates a new job."""
    api = await service_factory({"api": {"idempotency_window_seconds": 0.2}}, {"api"})
    headers = {"Idempotency-Key": "short"}
    _, first = await api.post("/download", body("http://origin.test/a", receiver), headers=headers)
    await asyncio.sleep(0.3)  # let the window pass
    _, second = await api.post("/download", body("http://origin.test/a", receiver), headers=headers)
    assert first["id"] != second["id"]


async def test_bad_idempotency_key_is_a_400(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """A key with spaces or control characters is refused, naming the header."""
    api = await service_factory(None, {"api"})
    status, err = await api.post(
        "/download", body("http://origin.test/a", receiver), headers={"Idempotency-Key": "a b"}
    )
    assert status == 400 and "Idempotency-Key" in err["error"]


async def test_abort_a_running_download(service: Service, receiver: CallbackReceiver) -> None:
    """DELETE interrupts a running download, removes its temp file and calls back a failure."""
    origin = StallingOrigin()
    try:
        job_id = await service.submit(**body(await origin.start(), receiver))
        await origin.started.wait()
        status, data = await service.http_delete(f"/jobs/{job_id}")
        assert status == 200 and data["download_state"] == "Failed"
        [cb] = await receiver.wait_for(job_id)
        assert cb["success"] is False and cb["error"] == "Aborted: cancelled by request"
        tmp = Path(service.config.processor.storage_dir) / ".tmp"
        await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
        for _ in range(50):  # the processor drops the temp file when its task is cancelled
            if not list(tmp.glob(f"{job_id}.*")):
                break
            await asyncio.sleep(0.02)
        assert not list(tmp.glob(f"{job_id}.*"))
        _, events = await service.get(f"/jobs/{job_id}/events")
        types = [e["type"] for e in events["events"]]
        assert "job.aborted" in types and "download.succeeded" not in types
        assert not (Path(service.config.processor.storage_dir) / job_id[:3] / job_id).exists()
    finally:
        origin.release.set()
        await origin.runner.cleanup()


async def test_abort_a_pending_download(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A job waiting behind the aggregation's cap is removed from its queue and never fetched."""
    origin = StallingOrigin()
    try:
        first = await service.submit(**body(await origin.start(), receiver))
        await origin.started.wait()
        second = await service.submit(**body(files.add("/never", b"x"), receiver))
        status, _ = await service.http_delete(f"/jobs/{second}")
        assert status == 200
        [cb] = await receiver.wait_for(second)
        assert cb["error"] == "Aborted: cancelled by request"
        origin.release.set()
        await receiver.wait_for(first)
        assert files.count("/never") == 0
        _, aggrs = await service.get("/dashboard/aggregations")
        assert aggrs == []
    finally:
        origin.release.set()
        await origin.runner.cleanup()


async def test_abort_unknown_or_finished(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """DELETE of an unknown job is 404, of a finished one 409."""
    status, _ = await service.http_delete("/jobs/doesnotexist")
    assert status == 404
    job_id = await service.submit(**body(files.add("/done", b"x"), receiver))
    await receiver.wait_for(job_id)
    status, err = await service.http_delete(f"/jobs/{job_id}")
    assert status == 409 and "already ended" in err["error"]


async def test_recent_failures_list_failed_downloads(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """/dashboard/failures lists the latest failed download with its error; / serves the page."""
    job_id = await service.submit(**body(files.add("/gone", Reply(b"", 410)), receiver))
    await receiver.wait_for(job_id)
    _, failures = await service.get("/dashboard/failures")
    assert failures[0]["job_id"] == job_id
    assert failures[0]["data"]["error"] == "Received status code 410"
    assert service.http is not None
    async with service.http.get(service.base_url + "/") as resp:
        assert resp.status == 200 and "<title>downloader</title>" in await resp.text()
