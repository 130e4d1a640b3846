"""Scaling out: three processor processes drain a backlog faster than one, and the aggregation
caps still hold across them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from downloader.config import Config
from downloader.storage import Keys
from tests.conftest import Proc, Service
from tests.servers import CallbackReceiver, _Server

JOBS = 300
AGGREGATIONS = 30
AGGR_LIMIT = 2  # x 30 aggregations: 60 downloads may run at once, far above one processor's 8
MAX_WORKERS = 8  # per processor process: what makes one processor the bottleneck
LATENCY_S = 0.05  # each answer waits this long, so a download holds its slot like a real one


class GatedOrigin(_Server):
    """Answers `/<aggr>/<job>` with 200 after LATENCY_S, recording the most concurrent requests
    per aggregation. Until `open_at` requests wait at once, it holds them all: the clock starts
    when every processor has filled its workers, not while some are still booting."""

    def __init__(self) -> None:
        super().__init__()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.open_at = 0
        self.gate = asyncio.Event()
        self.opened_at = 0.0

    async def start(self) -> GatedOrigin:
        app = web.Application()
        app.router.add_get("/{aggr}/{job}", self._handle)
        await self._start(app)
        return self

    def arm(self, open_at: int) -> None:
        self.open_at, self.gate = open_at, asyncio.Event()
        self.inflight.clear()
        self.max_inflight.clear()

    async def _handle(self, request: web.Request) -> web.Response:
        aggr = request.match_info["aggr"]
        self.inflight[aggr] += 1
        self.max_inflight[aggr] = max(self.max_inflight[aggr], self.inflight[aggr])
        try:
            if not self.gate.is_set() and self.inflight.total() >= self.open_at:
                self.opened_at = time.monotonic()
                self.gate.set()
            async with asyncio.timeout(30):
                await self.gate.wait()
            await asyncio.sleep(LATENCY_S)
            return web.Response(body=b"x" * 1024)
        finally:
            self.inflight[aggr] -= 1


async def wait_succeeded(r: aioredis.Redis, after: str, count: int, timeout_s: float) -> None:
    """Block on the global event stream until `count` downloads succeeded after `after`."""
    seen = 0
    keys = Keys("dl")
    deadline = time.monotonic() + timeout_s
    while seen < count:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise TimeoutError(f"only {seen} of {count} downloads succeeded")
        res = await r.xread({keys.events: after}, count=1000, block=remaining_ms)
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                after = entry_id
                seen += fields["type"] == "download.succeeded"


async def drain_seconds(
    processors: int,
    api: Service,
    origin: GatedOrigin,
    receiver: CallbackReceiver,
    redis_client: aioredis.Redis,
    config_path: Path,
    spawn: Callable[..., Proc],
) -> float:
    """Load a backlog through the API alone, start `processors` processes, and time from the
    moment they all work (the origin's gate opens) until the last download succeeded."""
    await redis_client.flushall()
    origin.arm(open_at=processors * MAX_WORKERS)
    for i in range(JOBS):
        aggr = f"scale{i % AGGREGATIONS}"
        await api.submit(
            aggr_id=aggr,
            aggr_limit=AGGR_LIMIT,
            url=origin.url(f"/{aggr}/job{i}"),
            callback_url=receiver.url("/cb"),
        )
    last = await redis_client.xrevrange(Keys("dl").events, count=1)
    procs = [spawn("processor", config_path) for _ in range(processors)]
    try:
        await wait_succeeded(redis_client, last[0][0], JOBS, timeout_s=60)
        elapsed = time.monotonic() - origin.opened_at
    finally:
        for p in procs:
            assert p.terminate() == 0, p.log()
    assert origin.gate.is_set()
    assert len(origin.max_inflight) == AGGREGATIONS
    assert max(origin.max_inflight.values()) <= AGGR_LIMIT, origin.max_inflight
    return elapsed


@pytest.mark.timeout(120)
async def test_three_processors_drain_a_backlog_faster_than_one_within_the_caps(
    make_config: Callable[..., tuple[Path, Config]],
    service_factory: Callable[..., Awaitable[Service]],
    redis_client: aioredis.Redis,
    receiver: CallbackReceiver,
    spawn: Callable[..., Proc],
) -> None:
    """With max_workers 8 per process and room for 60 downloads, 3 processors drain 300 jobs
    more than 1.5 times as fast as 1, and no aggregation ever runs more than its cap of 2."""
    config_path, _ = make_config({"processor": {"max_workers": MAX_WORKERS}}, name="scale.json")
    api = await service_factory(roles={"api"})
    origin = await GatedOrigin().start()
    try:
        one = await drain_seconds(1, api, origin, receiver, redis_client, config_path, spawn)
        three = await drain_seconds(3, api, origin, receiver, redis_client, config_path, spawn)
    finally:
        await origin.close()
    print(f"\n  scale: 1 processor {one:.2f} s, 3 processors {three:.2f} s: {one / three:.2f}x")
    assert one / three > 1.5
