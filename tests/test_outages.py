"""Redis outages: a restart loses nothing, an outage gets 503s (no hang) and everyone resumes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from downloader.embedded import EmbeddedRedis
from harness.servers import CallbackReceiver, FileServer, Reply, free_port


class DurableRedis(EmbeddedRedis):
    """A private redis-server that fsyncs its AOF on every write, so SIGKILL loses nothing."""

    def start(self, timeout_s: float = 10.0) -> None:
        super().start(timeout_s)
        import redis

        redis.Redis(host=self.host, port=self.port).config_set("appendfsync", "always")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path / "redis", "127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()


def job(url: str, receiver: CallbackReceiver, aggr: str = "o") -> dict[str, Any]:
    return {"aggr_id": aggr, "aggr_limit": 5, "url": url, "callback_url": receiver.url("/cb")}


async def test_redis_killed_and_restarted_mid_run_loses_nothing(
    own_redis: DurableRedis, service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """SIGKILL of Redis (AOF, fsync always) mid-run: processes reconnect, every job calls back."""
    svc = await service_factory({"redis": {"addr": own_redis.addr}})
    url = files.add("/r", b"payload")
    first = [await svc.submit(**job(url, receiver)) for _ in range(20)]
    own_redis.kill()
    await asyncio.sleep(0.3)  # an outage long enough for every loop to notice
    own_redis.start()
    second = [await svc.submit(**job(url, receiver)) for _ in range(20)]
    for job_id in first + second:
        [cb] = (await receiver.wait_for(job_id, timeout=20))[:1]
        assert cb["success"] is True


OUTAGE_S = 10.0


async def test_outage_answers_503_fast_and_hb_reports_it(
    own_redis: DurableRedis, service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Through a 10 s Redis outage every POST is 503 + Retry-After within 2 s and /hb is 503;
    afterwards the jobs accepted before it finish and new ones are taken."""
    svc = await service_factory({"redis": {"addr": own_redis.addr}})
    slow = files.add("/before", Reply(b"payload", status=503), Reply(b"payload"))
    before = await svc.submit(**job(slow, receiver))  # accepted just before the outage
    url = files.add("/o", b"payload")
    own_redis.kill()
    assert svc.http is not None
    outage_ends = time.monotonic() + OUTAGE_S
    answered = 0
    while time.monotonic() < outage_ends:
        started = time.monotonic()
        async with svc.http.post(svc.base_url + "/download", json=job(url, receiver)) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert "unavailable" in (await resp.json())["error"]
        async with svc.http.get(svc.base_url + "/hb") as resp:
            assert resp.status == 503
        assert time.monotonic() - started < 2
        answered += 1
        await asyncio.sleep(0.5)  # a client honouring Retry-After, roughly
    assert answered >= 5
    own_redis.start()
    job_id = await svc.submit(**job(url, receiver))
    for jid in (before, job_id):
        [cb] = (await receiver.wait_for(jid, timeout=20))[:1]
        assert cb["success"] is True
    async with svc.http.get(svc.base_url + "/hb") as resp:
        assert resp.status == 200


async def test_slow_callback_receiver_does_not_block_other_callbacks(
    service_factory: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A receiver that never answers trips backends.http.timeout; other callbacks still flow."""
    hang = aiohttp.web.Application()

    async def never(_request: aiohttp.web.Request) -> aiohttp.web.Response:
        await asyncio.sleep(3600)
        return aiohttp.web.Response()

    hang.router.add_post("/", never)
    runner = aiohttp.web.AppRunner(hang, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        svc = await service_factory({"backends": {"http": {"timeout": 0.5}}})
        url = files.add("/s", b"x")
        stuck = await svc.submit(
            aggr_id="stuck", aggr_limit=1, url=url, callback_url=f"http://127.0.0.1:{port}/"
        )
        others = [await svc.submit(**job(url, receiver, aggr=f"a{i}")) for i in range(10)]
        for job_id in others:
            await receiver.wait_for(job_id, timeout=5)
        failed = await svc.wait_job(stuck, lambda j: j["callback_state"] == "Failed", timeout=10)
        assert failed["delivery_error"] == "No answer within 0.5 s"
        assert failed["callback_attempts"] == 3
    finally:
        await runner.cleanup()


async def test_storage_raises_only_storage_unavailable_when_redis_is_down(
    make_config: Any,
) -> None:
    """Every storage call against a Redis that does not answer raises StorageUnavailable: the
    one type the API maps to 503 and the background loops back off on."""
    from downloader.errors import StorageUnavailable
    from downloader.storage import Storage, connect

    _path, config = make_config({"redis": {"addr": f"127.0.0.1:{free_port()}"}})
    storage = Storage(connect(config), config)
    try:
        calls = [
            storage.get_job("NoSuchJob0001"),
            storage.enqueue("NoSuchJob0002", {"aggr_id": "a", "aggr_limit": 1, "aggr_proxy": ""}),
            storage.claim(0, "a", "p", 1000, 1),
            storage.read_callbacks([0], "c", 1, 10),
            storage.pending_aggregations(),
            storage.publish_stats("api", "x", {}, 1000),
        ]
        for call in calls:
            with pytest.raises(StorageUnavailable):
                await call
    finally:
        await storage.close()


async def test_a_loop_stops_when_cancelled_even_if_redis_py_turns_it_into_an_outage() -> None:
    """redis-py can turn a cancellation that lands mid-reconnect into a connection error; a
    task told to stop must stop all the same (a notifier once hung in its shutdown waiting for
    its heartbeat loop after a Redis restart): storage gives it its cancellation back, not
    StorageUnavailable, so no caller that retries outages swallows it."""
    import redis.exceptions

    from downloader.errors import StorageUnavailable
    from downloader.resilience import forever
    from downloader.storage.base import guarded

    entered = asyncio.Event()

    @guarded
    class Reconnecting:  # a storage method whose redis-py call is cancelled mid-reconnect
        async def read(self) -> None:
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise redis.exceptions.ConnectionError("Error reconnecting: cancelled") from None

    async def retrying() -> None:  # like Processor._finish: an outage is waited out
        while True:
            try:
                await Reconnecting().read()
            except StorageUnavailable:
                await asyncio.sleep(0.01)

    for loop in (forever("heartbeat", Reconnecting().read, lambda: False), retrying()):
        entered.clear()
        task = asyncio.create_task(loop)
        await entered.wait()
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=5)
        assert task in done, "the task went on after it was cancelled"
        assert task.cancelled()


async def test_a_loop_stops_when_a_step_swallows_its_cancellation() -> None:
    """A step that absorbs a cancel and returns normally (as redis-py may, reconnecting) does
    not keep a loop running whose stopping() stays False (the notifier's heartbeat): the loop
    sees its task cancelled before the next step and ends."""
    from downloader.resilience import forever

    entered = asyncio.Event()
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, not re-raised
            await asyncio.sleep(3600)

    task = asyncio.create_task(forever("heartbeat", step, lambda: False))
    await entered.wait()
    task.cancel()
    done, _pending = await asyncio.wait({task}, timeout=5)
    assert task in done, "the loop went on after it was cancelled"
    assert task.cancelled() and steps == 1
