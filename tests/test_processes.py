"""The service as real OS processes: caps across processes, crashes, graceful stops, load, and
refusing to start on a bad configuration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from downloader.config import Config
from downloader.ids import shard_of
from downloader.storage import Keys, Storage
from harness.events import EventTail
from harness.redis_nodes import StrRedis
from harness.servers import CallbackReceiver, HoldingReceiver, _Server, free_port, wait_http
from tests.conftest import Proc, start_api

BODY = b"0123456789abcdef" * 256  # 4 KiB of text/plain
MakeConfig = Callable[..., tuple[Path, Config]]
Spawn = Callable[..., Proc]


class Origin(_Server):
    """An instrumented origin. Paths are `/<aggr>/<name>`; a name starting with `nf` answers 404,
    with `err` 500, anything else 200 with BODY. It records requests per path and the highest
    number of concurrent requests per aggregation.

    `hold_s` holds every answer; `stall_first` sends the headers and 100 bytes of a path's first
    request, then waits for `release`; `slow_first_s` streams a path's first body over that long.
    """

    def __init__(self, hold_s: float = 0.0, stall_first: bool = False, slow_first_s: float = 0.0):
        super().__init__()
        self.hold_s, self.stall_first, self.slow_first_s = hold_s, stall_first, slow_first_s
        self.release = asyncio.Event()
        self.requests: Counter[str] = Counter()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    async def start(self) -> Origin:
        app = web.Application()
        app.router.add_get("/{aggr}/{name}", self._handle)
        await self._start(app)
        return self

    async def close(self) -> None:
        self.release.set()
        await super().close()

    async def wait_requests(
        self, predicate: Callable[[Counter[str]], bool], timeout_s: float = 10
    ) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self.requests))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        aggr, name = request.match_info["aggr"], request.match_info["name"]
        self.inflight[aggr] += 1
        self.max_inflight[aggr] = max(self.max_inflight[aggr], self.inflight[aggr])
        async with self._changed:
            self.requests[request.path] += 1
            first = self.requests[request.path] == 1
            self._changed.notify_all()
        try:
            if first and (self.stall_first or self.slow_first_s):
                return await self._trickle(request)
            await asyncio.sleep(self.hold_s)
            status = 404 if name.startswith("nf") else 500 if name.startswith("err") else 200
            return web.Response(status=status, body=BODY if status == 200 else b"")
        finally:
            self.inflight[aggr] -= 1

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the downloading process may be gone
            if self.stall_first:
                await resp.write(BODY[:100])
                await self.release.wait()
                await resp.write(BODY[100:])
            else:
                pieces = 16
                step = -(-len(BODY) // pieces)
                for i in range(pieces):
                    await asyncio.sleep(self.slow_first_s / pieces)
                    await resp.write(BODY[i * step : (i + 1) * step])
        return resp


@pytest.fixture
async def origin_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[Origin] = []

    async def make(**kw: Any) -> Origin:
        started.append(await Origin(**kw).start())
        return started[-1]

    yield make
    for o in started:
        await o.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def submit(http: aiohttp.ClientSession, api: str, **body: Any) -> str:
    async with http.post(f"{api}/download", json=body) as r:
        data = await r.json()
        assert r.status == 201, data
        return str(data["id"])


def job(origin: Origin, aggr: str, name: str, callback: str, **extra: Any) -> dict[str, Any]:
    return {
        "aggr_id": aggr,
        "aggr_limit": 10,
        "url": origin.url(f"/{aggr}/{name}"),
        "callback_type": "http",
        "callback_dst": callback,
        **extra,
    }


async def live_processors(r: StrRedis, keys: Keys, count: int) -> list[str]:
    """Wait (a bounded poll: other OS processes starting) until `count` processors publish stats."""
    deadline = time.monotonic() + 15
    while True:
        members = await r.zrange(keys.instances, 0, -1)
        ids = [m.split(":", 1)[1] for m in members if m.startswith("processor:")]
        alive = [i for i in ids if await r.exists(keys.stats("processor", i))]
        if len(alive) >= count:
            return alive
        assert time.monotonic() < deadline, f"only {len(alive)} processors came up"
        await asyncio.sleep(0.05)


async def processor_stats(r: StrRedis, keys: Keys) -> list[dict[str, str]]:
    """The stats each live processor process published last."""
    members = await r.zrange(keys.instances, 0, -1)
    ids = [m.split(":", 1)[1] for m in members if m.startswith("processor:")]
    return [s for s in [await r.hgetall(keys.stats("processor", i)) for i in ids] if s]


def owned_by(proc: Proc, owner: str) -> bool:
    """Instance ids are `host-pid-random`."""
    assert proc.popen is not None
    return f"-{proc.popen.pid}-" in owner


# -- aggregation caps across processes -----------------------------------------------------------


async def test_aggregation_cap_holds_across_two_processor_processes(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
) -> None:
    """Two processor processes of 2 workers each (room for 4) never run more than the
    aggregation's limit of 3 downloads at once; reaching 3 takes both of them."""
    origin: Origin = await origin_factory(hold_s=0.1)
    path, config = make_config({"processor": {"max_workers": 2}})
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    spawn("processor", path)
    spawn("processor", path)
    spawn("notifier", path)
    api = await start_api(spawn, path)
    await live_processors(redis_client, keys, 2)

    ids = [
        await submit(http, api, **job(origin, "cap", f"f{i}", receiver.url("/cb"), aggr_limit=3))
        for i in range(40)
    ]
    await receiver.wait_total(40, timeout=20)
    assert sorted(cb["job_id"] for cb in receiver.received) == sorted(ids)
    assert all(cb["success"] for cb in receiver.received)
    assert origin.max_inflight["cap"] <= 3

    # each job was fetched once, and both processes took part (their stats count claims):
    # one alone holds at most 2 slots, so the third always went to the other
    assert sorted(origin.requests.values()) == [1] * 40
    deadline = time.monotonic() + 5
    while True:  # a bounded poll: the processes publish their stats every 100 ms
        stats = await processor_stats(redis_client, keys)
        claimed = [int(s.get("spawnedWorkers", 0)) for s in stats]
        if sum(claimed) == 40 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(claimed) == 2 and sum(claimed) == 40 and min(claimed) > 0, claimed


async def test_processor_stats_count_every_success_it_recorded(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
) -> None:
    """A processor's `successes` counter equals the download.succeeded events it wrote."""
    origin: Origin = await origin_factory()
    # short leases renew often: many renewals overlap with downloads being recorded
    path, config = make_config({"processor": {"lease_ms": 300}})
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    spawn("processor", path)
    api = await start_api(spawn, path)
    await live_processors(redis_client, keys, 1)
    tail = EventTail(redis_client, keys)
    cb_url = receiver.url("/cb")
    bodies = [job(origin, f"st{i % 4}", f"s{i}", cb_url, aggr_limit=50) for i in range(300)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as client:
        await asyncio.gather(*(submit(client, api, **b) for b in bodies))
    await tail.wait(lambda t: t.count("download.succeeded") == 300, timeout_s=20)

    deadline = time.monotonic() + 2
    while True:  # a bounded poll: the process publishes its stats every 100 ms
        [stats] = await processor_stats(redis_client, keys)
        if int(stats["successes"]) >= 300 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert int(stats["successes"]) == 300, stats


# -- a processor crashes or is stopped -----------------------------------------------------------


async def test_sigkilled_processor_loses_no_job(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
) -> None:
    """Jobs of a processor killed mid-download are requeued when the lease expires, and finished."""
    origin: Origin = await origin_factory(stall_first=True)
    path, config = make_config()
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    first = spawn("processor", path)
    spawn("notifier", path)
    api = await start_api(spawn, path)
    tail = EventTail(redis_client, keys)

    cb_url = receiver.url("/cb")
    ids = [await submit(http, api, **job(origin, "kill", f"k{i}", cb_url)) for i in range(4)]
    await origin.wait_requests(lambda seen: len(seen) == 4)
    tmp_dir = Path(config.processor.storage_dir) / ".tmp"
    owners = await redis_client.hmget(keys.lease_owners(shard_of(ids[0])), ids)
    assert all(owned_by(first, o) for o in owners), owners

    first.kill()  # mid-body: the origin sent 100 bytes of each and stalls
    second = spawn("processor", path)
    for job_id in ids:
        [cb] = await receiver.wait_for(job_id, timeout=15)
        assert cb["success"] is True, cb
        stored = Path(config.processor.storage_dir) / job_id[:3] / job_id
        assert stored.read_bytes() == BODY
    await tail.wait(lambda t: all("callback.delivered" in t.types(j) for j in ids))
    for job_id in ids:
        assert tail.types(job_id)[:5] == [
            "job.accepted",
            "download.started",
            "download.requeued",
            "download.started",
            "download.succeeded",
        ]
        [(requeued, requeued_ts), *_] = tail.of_type(job_id, "download.requeued")
        assert requeued == {"attempt": 1, "reason": "lease expired"}
        [(_started, started_ts), *_] = tail.of_type(job_id, "download.started")
        assert requeued_ts - started_ts >= config.processor.lease_ms  # it lapsed, not earlier
    assert all(n == 2 for n in origin.requests.values()), origin.requests
    # the surviving processor leaves no temporary file behind
    leftovers = [p.name for p in tmp_dir.iterdir() if owned_by(second, p.name)]
    assert leftovers == []


async def test_sigterm_hands_a_stuck_download_back_at_once(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
) -> None:
    """SIGTERM exits 0 after the grace and requeues ("shutdown") a stuck download, without
    waiting for its lease; another processor finishes it."""
    origin: Origin = await origin_factory(stall_first=True)
    grace_s, lease_ms = 0.5, 5000
    path, config = make_config(
        {"processor": {"lease_ms": lease_ms, "shutdown_grace_seconds": grace_s}}
    )
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    procs = [spawn("processor", path), spawn("processor", path)]
    spawn("notifier", path)
    api = await start_api(spawn, path)
    await live_processors(redis_client, keys, 2)
    tail = EventTail(redis_client, keys)

    job_id = await submit(http, api, **job(origin, "term", "t1", receiver.url("/cb")))
    await origin.wait_requests(lambda seen: sum(seen.values()) == 1)
    owner = await redis_client.hget(keys.lease_owners(shard_of(job_id)), job_id)
    [holder] = [p for p in procs if owned_by(p, owner)]

    sent_ms = time.time() * 1000
    started = time.monotonic()
    rc = await asyncio.to_thread(holder.terminate, 10)
    stopped_s = time.monotonic() - started
    assert rc == 0, holder.log()
    assert stopped_s < grace_s + 1.5, stopped_s

    [cb] = await receiver.wait_for(job_id, timeout=10)
    assert cb["success"] is True
    await tail.wait(lambda t: "callback.delivered" in t.types(job_id))
    assert tail.types(job_id)[:5] == [
        "job.accepted",
        "download.started",
        "download.requeued",
        "download.started",
        "download.succeeded",
    ]
    [(requeued, requeued_ts)] = tail.of_type(job_id, "download.requeued")
    assert requeued == {"attempt": 1, "reason": "shutdown"}
    # handed back once the grace was over, long before the 5 s lease would have run out
    assert grace_s * 1000 - 50 <= requeued_ts - sent_ms < (grace_s + 1.5) * 1000 < lease_ms
    assert origin.requests["/term/t1"] == 2


async def test_draining_processor_keeps_its_leases_through_the_grace(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
) -> None:
    """A download that finishes within the shutdown grace is finished by its processor, not
    requeued and fetched again because its lease lapsed while the processor drained."""
    origin: Origin = await origin_factory(slow_first_s=2.0)
    path, config = make_config({"processor": {"shutdown_grace_seconds": 3}})  # lease_ms 1000
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    procs = [spawn("processor", path), spawn("processor", path)]
    spawn("notifier", path)
    api = await start_api(spawn, path)
    await live_processors(redis_client, keys, 2)
    tail = EventTail(redis_client, keys)

    job_id = await submit(http, api, **job(origin, "drain", "d1", receiver.url("/cb")))
    await origin.wait_requests(lambda seen: sum(seen.values()) == 1)
    owner = await redis_client.hget(keys.lease_owners(shard_of(job_id)), job_id)
    [holder] = [p for p in procs if owned_by(p, owner)]
    stopping = asyncio.create_task(asyncio.to_thread(holder.terminate, 10))

    [cb] = await receiver.wait_for(job_id, timeout=10)
    assert cb["success"] is True
    assert await stopping == 0, holder.log()
    await tail.wait(lambda t: "callback.delivered" in t.types(job_id))
    assert tail.types(job_id)[:3] == ["job.accepted", "download.started", "download.succeeded"]
    assert origin.requests["/drain/d1"] == 1


# -- a notifier crashes --------------------------------------------------------------------------


async def test_sigkilled_notifier_callbacks_are_reclaimed_and_delivered(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
    store: Storage,
    holding: HoldingReceiver,
) -> None:
    """Callbacks a killed notifier was delivering are taken over by a notifier started after it
    once its liveness lapses, and delivered (attempt 2 records)."""
    origin: Origin = await origin_factory()
    path, config = make_config()
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    spawn("processor", path)
    first = spawn("notifier", path)
    api = await start_api(spawn, path)
    tail = EventTail(redis_client, keys)

    cb_url = holding.url("/cb")
    ids = [await submit(http, api, **job(origin, "nk", f"n{i}", cb_url)) for i in range(5)]
    await holding.wait(lambda: len(holding.held) == 5)
    first.kill()
    spawn("notifier", path)

    await holding.wait(lambda: all(holding.delivered[j] for j in ids), timeout_s=40)
    await tail.wait(lambda t: all("callback.delivered" in t.types(j) for j in ids))
    for job_id in ids:
        assert holding.delivered[job_id][0]["success"] is True
        attempts = [d["attempt"] for d, _ts in tail.of_type(job_id, "callback.attempted")]
        assert attempts == [1, 2]
        [(delivered, _ts)] = tail.of_type(job_id, "callback.delivered")
        assert delivered == {"attempt": 2}
        assert (await store.get_job(job_id)).callback_state == "Success"
    for shard in range(keys.shards):
        pending = await redis_client.xpending(keys.callbacks(shard), "notifiers")
        assert (pending["pending"], pending["consumers"]) == (0, []), shard


# -- load ----------------------------------------------------------------------------------------


async def test_run_under_load_one_final_callback_per_job_and_caps_hold(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
) -> None:
    """`downloader run`: 300 jobs over 5 aggregations, a third succeeding, each gets exactly one
    callback with the right outcome, and no aggregation exceeds its limit of 10."""
    origin: Origin = await origin_factory(hold_s=0.05)
    path, config = make_config()
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    port = free_port()
    spawn("run", path, port)
    api = f"http://127.0.0.1:{port}"
    await wait_http(f"{api}/hb")
    tail = EventTail(redis_client, keys)

    kinds = ("ok", "nf", "err")
    bodies = [
        job(origin, f"load{i % 5}", f"{kinds[i % 3]}{i}", receiver.url("/cb"), max_retries=1)
        for i in range(300)
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as client:
        ids = await asyncio.gather(*(submit(client, api, **b) for b in bodies))
    expected = {job_id: kinds[i % 3] for i, job_id in enumerate(ids)}
    await tail.wait(lambda t: t.count("callback.delivered") == 300, timeout_s=30)

    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cb in receiver.received:
        by_job[cb["job_id"]].append(cb)
    assert sorted(by_job) == sorted(ids)
    for job_id, kind in expected.items():
        [cb] = by_job[job_id]
        assert (cb["success"], cb["response_code"]) == {
            "ok": (True, 200),
            "nf": (False, 404),
            "err": (False, 500),
        }[kind], cb
        assert tail.types(job_id).count("download.started") == (2 if kind == "err" else 1)
    # no aggregation ever ran past its limit of 10 (how close each came depends on the machine)
    assert set(origin.max_inflight) == {f"load{i}" for i in range(5)}
    assert max(origin.max_inflight.values()) <= 10, origin.max_inflight
    assert sum(origin.requests.values()) == 400


async def test_run_accepts_a_burst_of_concurrent_submissions(
    spawn: Spawn,
    make_config: MakeConfig,
    origin_factory: Callable[..., Any],
    receiver: CallbackReceiver,
) -> None:
    """`downloader run` accepts 200 concurrent POST /download, none refused as storage trouble."""
    origin: Origin = await origin_factory()
    path, _config = make_config()
    port = free_port()
    spawn("run", path, port)
    api = f"http://127.0.0.1:{port}"
    await wait_http(f"{api}/hb")
    body = job(origin, "burst", "b", receiver.url("/cb"))

    async def post(client: aiohttp.ClientSession) -> int:
        async with client.post(f"{api}/download", json=body) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as client:
        statuses = Counter(await asyncio.gather(*(post(client) for _ in range(200))))
    assert statuses == {201: 200}


# -- refusing to start ---------------------------------------------------------------------------


def write_raw(make_config: MakeConfig, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A config file from the test defaults with `edit` applied, not validated."""
    good, _ = make_config(name=f"good-{name}")
    raw = json.loads(good.read_text())
    edit(raw)
    path = good.with_name(name)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda raw: raw["processor"].update(retry_backoff_seconds="soon"),
            "processor.retry_backoff_seconds: Input should be a valid number",
        ),
        (
            lambda raw: raw["notifier"].update(retry_every="1m"),
            "notifier.retry_every: unknown key",
        ),
    ],
    ids=["bad-value", "unknown-key"],
)
async def test_run_refuses_a_bad_config_naming_the_key(
    spawn: Spawn, make_config: MakeConfig, edit: Callable[[dict[str, Any]], None], named: str
) -> None:
    """`downloader run` with a bad value or an unknown key exits non-zero naming the key."""
    proc = spawn("run", write_raw(make_config, "bad.json", edit), free_port())
    assert proc.popen is not None
    rc = await asyncio.to_thread(proc.popen.wait, 15)
    assert rc != 0
    assert named in proc.log()


async def test_notifier_without_a_backend_refuses_to_start(
    spawn: Spawn, make_config: MakeConfig
) -> None:
    """`downloader notifier` with no callback backend configured exits non-zero saying so."""
    path = write_raw(make_config, "nobackend.json", lambda raw: raw.update(backends={}))
    proc = spawn("notifier", path)
    assert proc.popen is not None
    rc = await asyncio.to_thread(proc.popen.wait, 15)
    assert rc != 0
    assert "the notifier needs a backend" in proc.log(), proc.log()
