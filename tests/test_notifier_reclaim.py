"""A gone notifier's callbacks move on once its liveness key lapses; a live one's never do: the
takeover script, the fenced callback_end, and real notifier processes killed or stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from downloader.cli import make_notifier
from downloader.config import Config
from downloader.embedded import EmbeddedRedis
from downloader.heartbeat import Liveness
from downloader.ids import new_job_id, shard_of
from downloader.models import parse_download_request
from downloader.storage import CALLBACK_GROUP, Keys, Storage, connect
from downloader.vocabulary import CallbackOutcome, DownloadOutcome
from harness.redis_nodes import StrRedis
from harness.servers import (
    CallbackReceiver,
    FileServer,
    HoldingReceiver,
    TcpRelay,
    job_request,
    until,
)
from tests.conftest import Proc, start_api

MakeConfig = Callable[..., tuple[Path, Config]]
Spawn = Callable[..., Proc]


# -- helpers -------------------------------------------------------------------------------------


async def new_storage(make_config: MakeConfig) -> Storage:
    _path, config = make_config()
    return Storage(connect(config), config)


async def job_awaiting_callback(storage: Storage, callback_url: str = "http://c/") -> str:
    """A job whose download succeeded: its callback entry is on its shard's callbacks stream."""
    req = parse_download_request(
        {"aggr_id": "r", "aggr_limit": 5, "url": "http://o.test/x", "callback_url": callback_url}
    )
    job_id = new_job_id(await storage.shard_for("r"))
    await storage.enqueue(job_id, req.job_fields(2))
    [claimed] = (await storage.claim(shard_of(job_id), "r", "proc", 60_000, 1)).jobs
    done = {
        "attempt": 1,
        "response_code": 200,
        "download_url": "u",
        "file_mime_type": "t/p",
        "file_bytes": 1,
        "image_size": "",
    }
    assert (await storage.finish(job_id, claimed.lease, DownloadOutcome.SUCCEEDED, done)).recorded
    return str(job_id)


async def consumers(r: StrRedis, keys: Keys, shard: int | None = None) -> dict[str, int]:
    """The callbacks group's consumers and their pending counts: of one shard, or summed over
    every shard (a consumer joins a shard's group when first handed one of its entries)."""
    counts: dict[str, int] = {}
    for s in range(keys.shards) if shard is None else [shard]:
        for row in await r.xinfo_consumers(keys.callbacks(s), CALLBACK_GROUP):
            counts[row["name"]] = counts.get(row["name"], 0) + int(row["pending"])
    return counts


async def instance_of(r: StrRedis, keys: Keys, proc: Proc, timeout_s: float = 20) -> str:
    """The instance id of a spawned notifier, once its liveness key exists (a bounded poll:
    another OS process starting)."""
    assert proc.popen is not None
    prefix = keys.alive("notifier", "")
    deadline = time.monotonic() + timeout_s
    while True:
        for key in await r.keys(keys.alive("notifier", "*")):
            if f"-{proc.popen.pid}-" in key:
                return str(key[len(prefix) :])
        assert time.monotonic() < deadline, f"notifier never beat:\n{proc.log()}"
        await asyncio.sleep(0.05)


async def until_async(check: Callable[[], Any], timeout_s: float) -> None:
    """A bounded poll of a state another OS process reaches."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.05)


async def submit_jobs(api: str, files: FileServer, callback: str, n: int) -> list[str]:
    url = files.add("/r", b"payload")
    ids = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            body = {"aggr_id": "r", "aggr_limit": n, "url": url, "callback_url": callback}
            async with http.post(f"{api}/download", json=body) as resp:
                assert resp.status == 201, await resp.text()
                ids.append(str((await resp.json())["id"]))
    return ids


async def callback_events(storage: Storage, job_id: str) -> list[tuple[str, Any]]:
    events = await storage.get_events(job_id)
    return [(e.type, e.data()) for e in events if e.type.startswith("callback")]


async def all_settled(storage: Storage, ids: list[str]) -> bool:
    states = [(await storage.get_job(j)).callback_state for j in ids]
    return all(s == "Success" for s in states)


# -- the takeover script and the fence, against Redis --------------------------------------------


async def test_takeover_moves_only_a_gone_consumers_entries_each_to_one_taker(
    make_config: MakeConfig, redis_client: StrRedis
) -> None:
    """Concurrent takeovers split a gone consumer's entries with no overlap and delete it once
    empty; a consumer whose liveness key exists keeps its entries."""
    storage = await new_storage(make_config)
    keys = storage.keys
    try:
        await storage.ensure_callback_groups()
        for i in range(23):
            await redis_client.xadd(keys.callbacks(0), {"job_id": f"J{i}"})
        gone = [(e, j) for _s, e, j in await storage.read_callbacks([0], "gone", 20, 100)]
        live = await storage.read_callbacks([0], "live", 3, 100)
        for alive in ("live", "b", "c"):
            await storage.beat("notifier", alive, 60_000)
        results = await asyncio.gather(
            *(storage.take_over_callbacks(taker, 7) for taker in ("b", "c", "b", "c"))
        )
        taken = [e for takeovers in results for t in takeovers for e in t.entries]
        assert sorted(taken) == sorted(gone)  # every entry once, none of the live one's
        assert {t.consumer for takeovers in results for t in takeovers} == {"gone"}
        assert sum(t.deleted for takeovers in results for t in takeovers) == 1
        pending = await consumers(redis_client, keys)
        assert "gone" not in pending
        assert pending["live"] == len(live)
        assert pending["b"] + pending["c"] == len(gone)
    finally:
        await storage.close()


async def test_a_stale_attempt_records_nothing_and_leaves_the_entry_to_the_taker(
    make_config: MakeConfig, redis_client: StrRedis
) -> None:
    """When a notifier thought gone finishes after its entry was taken over, its result is not
    recorded and the entry stays pending with the taker until the taker's attempt records."""
    storage = await new_storage(make_config)
    keys = storage.keys
    try:
        stale = await job_awaiting_callback(storage)
        shard = shard_of(stale)
        await storage.ensure_callback_groups()
        [(_s, entry, _job)] = await storage.read_callbacks([shard], "slow", 10, 100)
        first = await storage.callback_begin(stale)
        assert first is not None
        [takeover] = await storage.take_over_callbacks("taker", 10)
        assert takeover.entries == [(entry, stale)]
        assert await storage.callback_begin(stale, entry, "slow") is None  # no longer its entry
        second = await storage.callback_begin(stale)
        assert second is not None
        assert (first.callback_attempts, second.callback_attempts) == (1, 2)

        late = {"attempt": 1, "delivery_error": "500", "retry_in_ms": 10}
        assert await storage.callback_end(stale, CallbackOutcome.RETRY, late, entry, 10) == ""
        assert (await storage.get_job(stale)).callback_state == "InProgress"
        assert await redis_client.zcard(keys.callback_retries(shard)) == 0
        assert await consumers(redis_client, keys, shard) == {"taker": 1}

        assert await storage.callback_end(
            stale, CallbackOutcome.DELIVERED, {"attempt": 2}, entry, 60_000
        )
        assert (await storage.get_job(stale)).callback_state == "Success"
        assert await consumers(redis_client, keys, shard) == {"taker": 0}

        # the slow one again, after the end: still nothing recorded
        failed = {"attempt": 1, "delivery_error": "gone"}
        assert await storage.callback_end(stale, CallbackOutcome.FAILED, failed, entry, 0) == ""
        assert (await storage.get_job(stale)).callback_state == "Success"
        types = [t for t, _d in await callback_events(storage, stale)]
        assert types == ["callback.attempted", "callback.attempted", "callback.delivered"]
    finally:
        await storage.close()


async def test_an_entry_left_pending_with_a_live_notifier_is_delivered_by_it(
    make_config: MakeConfig, receiver: CallbackReceiver
) -> None:
    """An entry pending with a running notifier that holds no delivery of it (the write that
    settled it was lost with a failed-over master) is delivered by that notifier when it next
    looks through its own entries (every dead_after_ms): nobody else would take it over."""
    _path, config = make_config({"notifier": {"heartbeat_ms": 50, "dead_after_ms": 300}})
    storage = Storage(connect(config), config)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        job_id = await job_awaiting_callback(storage, receiver.url("/cb"))
        await storage.ensure_callback_groups()
        [_entry] = await storage.read_callbacks([shard_of(job_id)], "keeper", 10, 100)
        task = asyncio.create_task(make_notifier(config, storage, "keeper").run(stop))
        [payload] = await receiver.wait_for(job_id, timeout=10)
        assert payload["success"] is True
        await until_async(lambda: all_settled(storage, [job_id]), timeout_s=10)
        assert await consumers(storage.r, storage.keys, shard_of(job_id)) == {"keeper": 0}
    finally:
        stop.set()
        if task is not None:
            await task
        await storage.close()


@pytest.fixture
async def relay(redis_server: EmbeddedRedis) -> AsyncIterator[TcpRelay]:
    """A TCP relay to the test Redis (stop() is an outage); closed after the services."""
    relay = await TcpRelay(redis_server.port).start()
    yield relay
    await relay.stop()


async def test_a_callback_cut_short_by_a_redis_outage_is_delivered_again_by_its_notifier(
    relay: TcpRelay, service_factory: Any, files: FileServer, holding: HoldingReceiver
) -> None:
    """A notifier that lost Redis while recording a delivery delivers that callback again
    itself once Redis is back (its own entry: nobody takes it over from a live notifier)."""
    front = await service_factory(roles={"api", "processor"})
    back = await service_factory({"redis": {"addr": f"127.0.0.1:{relay.port}"}}, roles={"notifier"})
    job_id = await front.submit(**job_request(files.add("/o", b"x"), holding.url("/cb")))
    await holding.wait(lambda: len(holding.held) == 1, timeout_s=10)
    await relay.stop()
    holding.release.set()  # answered 200: recording it fails, Redis is unreachable
    await until(lambda: back.notifier._orphaned, timeout=10)
    await relay.start()
    await holding.wait(lambda: len(holding.delivered) == 1, timeout_s=20)
    job = await front.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert job["callback_attempts"] == 2
    events = await callback_events(front.storage, job_id)
    assert [t for t, _d in events] == [
        "callback.attempted",
        "callback.attempted",
        "callback.delivered",
    ]


# -- real notifier processes ---------------------------------------------------------------------

OpenStorage = Callable[[Config], Storage]


@pytest.fixture
async def open_storage() -> AsyncIterator[OpenStorage]:
    """Storage clients on a test's config, closed after the test."""
    opened: list[Storage] = []

    def open_(config: Config) -> Storage:
        opened.append(Storage(connect(config), config))
        return opened[-1]

    yield open_
    for storage in opened:
        await storage.close()


@pytest.mark.timeout(120)
async def test_sigkilled_notifier_callbacks_move_on_once_its_heartbeat_lapses(
    spawn: Spawn,
    make_config: MakeConfig,
    redis_client: StrRedis,
    files: FileServer,
    open_storage: OpenStorage,
    holding: HoldingReceiver,
) -> None:
    """A notifier SIGKILLed mid-delivery: a running notifier delivers every one of its
    callbacks once its liveness lapses, long before claim_idle_ms (120 s, now ignored), and the
    dead consumer leaves the group."""
    path, config = make_config({"notifier": {"claim_idle_ms": 120_000}})
    storage = open_storage(config)
    keys = storage.keys
    spawn("processor", path)
    first = spawn("notifier", path)
    api = await start_api(spawn, path)
    ids = await submit_jobs(api, files, holding.url("/cb"), 8)
    await holding.wait(lambda: len(holding.held) == 8, timeout_s=30)
    second = spawn("notifier", path)
    survivor = await instance_of(redis_client, keys, second)
    first.kill()

    await holding.wait(lambda: len(holding.delivered) == 8, timeout_s=60)
    assert set(holding.delivered) == set(ids)
    assert all(len(holding.delivered[j]) == 1 for j in ids)
    await until_async(lambda: all_settled(storage, ids), timeout_s=10)
    for job_id in ids:
        events = await callback_events(storage, job_id)
        assert events == [
            ("callback.attempted", {"attempt": 1}),
            ("callback.attempted", {"attempt": 2}),
            ("callback.delivered", {"attempt": 2}),
        ]
    assert await consumers(redis_client, keys) == {survivor: 0}


@pytest.mark.timeout(120)
async def test_a_slow_live_notifier_keeps_its_callbacks(
    spawn: Spawn,
    make_config: MakeConfig,
    redis_client: StrRedis,
    files: FileServer,
    open_storage: OpenStorage,
) -> None:
    """Callbacks whose receiver answers after 7 s (past the 5 s liveness lapse and a 1 s
    claim_idle_ms) are delivered once each by the notifier that took them; the other running
    notifier never takes one."""
    receiver = await CallbackReceiver().start()
    receiver.delay_s = 7.0
    try:
        path, config = make_config(
            {"notifier": {"claim_idle_ms": 1000}, "backends": {"http": {"timeout": 30}}}
        )
        storage = open_storage(config)
        keys = storage.keys
        spawn("processor", path)
        notifiers = [spawn("notifier", path) for _ in range(2)]
        for n in notifiers:
            await instance_of(redis_client, keys, n)
        api = await start_api(spawn, path)
        ids = await submit_jobs(api, files, receiver.url("/cb"), 6)

        await receiver.wait_total(6, timeout=60)
        await until_async(lambda: all_settled(storage, ids), timeout_s=10)
        for job_id in ids:
            assert len(receiver.for_job(job_id)) == 1
            events = await callback_events(storage, job_id)
            assert events == [
                ("callback.attempted", {"attempt": 1}),
                ("callback.delivered", {"attempt": 1}),
            ]
        assert all(n.popen is not None and n.popen.poll() is None for n in notifiers)
    finally:
        await receiver.close()


@pytest.mark.timeout(120)
async def test_a_gone_notifier_without_callbacks_leaves_the_group(
    spawn: Spawn,
    make_config: MakeConfig,
    redis_client: StrRedis,
    files: FileServer,
    receiver: CallbackReceiver,
    open_storage: OpenStorage,
) -> None:
    """The consumer of a notifier SIGKILLed with nothing pending is deleted from the group by
    another notifier once its liveness lapses: restarts do not grow the group."""
    path, config = make_config()
    storage = open_storage(config)
    keys = storage.keys
    spawn("processor", path)
    first = spawn("notifier", path)
    dead = await instance_of(redis_client, keys, first)
    api = await start_api(spawn, path)
    # Redis 6.2 adds a consumer to the group when it is first handed an entry
    [job_id] = await submit_jobs(api, files, receiver.url("/cb"), 1)
    await receiver.wait_for(job_id, timeout=30)
    await until_async(lambda: all_settled(storage, [job_id]), timeout_s=10)
    assert await consumers(redis_client, keys) == {dead: 0}
    first.kill()
    survivor = await instance_of(redis_client, keys, spawn("notifier", path))

    async def only_survivor() -> bool:
        return dead not in await consumers(redis_client, keys)

    await until_async(only_survivor, timeout_s=60)
    assert set(await consumers(redis_client, keys)) <= {survivor}


@pytest.mark.timeout(120)
async def test_sigterm_hands_unsettled_callbacks_over_at_once(
    spawn: Spawn,
    make_config: MakeConfig,
    redis_client: StrRedis,
    files: FileServer,
    open_storage: OpenStorage,
    holding: HoldingReceiver,
) -> None:
    """A notifier stopped by SIGTERM with callbacks still held past its grace exits 0 with its
    liveness key already deleted (no lapse to wait for); another notifier delivers them."""
    path, config = make_config({"notifier": {"shutdown_grace_seconds": 0.5}})
    storage = open_storage(config)
    keys = storage.keys
    spawn("processor", path)
    first = spawn("notifier", path)
    stopping = await instance_of(redis_client, keys, first)
    api = await start_api(spawn, path)
    ids = await submit_jobs(api, files, holding.url("/cb"), 5)
    await holding.wait(lambda: len(holding.held) == 5, timeout_s=30)
    await instance_of(redis_client, keys, spawn("notifier", path))

    assert first.terminate() == 0, first.log()
    assert await redis_client.exists(keys.alive("notifier", stopping)) == 0
    await holding.wait(lambda: len(holding.delivered) == 5, timeout_s=60)
    assert set(holding.delivered) == set(ids)
    await until_async(lambda: all_settled(storage, ids), timeout_s=10)


@pytest.mark.timeout(120)
async def test_a_stopping_notifier_keeps_its_callbacks_through_the_grace(
    spawn: Spawn,
    make_config: MakeConfig,
    redis_client: StrRedis,
    files: FileServer,
    open_storage: OpenStorage,
    holding: HoldingReceiver,
) -> None:
    """A notifier given SIGTERM beats on through its grace: callbacks it finishes 7 s later
    (past the 5 s lapse) are recorded by it, once, and no other notifier takes one."""
    path, config = make_config(
        {"notifier": {"shutdown_grace_seconds": 30}, "backends": {"http": {"timeout": 30}}}
    )
    storage = open_storage(config)
    keys = storage.keys
    spawn("processor", path)
    first = spawn("notifier", path)
    api = await start_api(spawn, path)
    ids = await submit_jobs(api, files, holding.url("/cb"), 4)
    await holding.wait(lambda: len(holding.held) == 4, timeout_s=30)
    await instance_of(redis_client, keys, spawn("notifier", path))
    assert first.popen is not None
    first.popen.terminate()
    await asyncio.sleep(7)  # a holding this slow: the load's shape, not a wait for an event
    holding.release.set()

    assert await asyncio.to_thread(first.popen.wait, 30) == 0, first.log()
    await until_async(lambda: all_settled(storage, ids), timeout_s=10)
    assert holding.delivered == {}  # no second delivery of any
    for job_id in ids:
        events = await callback_events(storage, job_id)
        assert events == [
            ("callback.attempted", {"attempt": 1}),
            ("callback.delivered", {"attempt": 1}),
        ]


async def test_a_fresh_notifier_judges_others_only_after_a_lapse(make_config: MakeConfig) -> None:
    """A notifier that just started (perhaps right after a Redis outage, while the live ones
    are still backing off) takes nobody for gone before one `dead_after_ms` has passed since
    its first beat."""
    storage = await new_storage(make_config)
    try:
        liveness = Liveness(storage, "notifier", "fresh", interval_ms=10, dead_after_ms=300)
        began = time.monotonic()
        await liveness.step()
        assert liveness.started.is_set() and not liveness.may_judge_others()
        while not liveness.may_judge_others():
            await liveness.step()
        assert time.monotonic() - began >= 0.3  # a lower bound: load cannot break it
    finally:
        await storage.close()
