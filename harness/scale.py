"""The scale-out scenario: a backlog drained by one or several processor processes, through an
origin that records the most concurrent requests per aggregation (the caps must hold across
processes) and holds every answer until all processors are busy."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from aiohttp import web

from downloader.vocabulary import EventType
from harness.events import EventTail
from harness.net import free_port

__all__ = ["GatedOrigin", "wait_succeeded"]


class GatedOrigin:
    """Answers `/<aggr>/<job>` with 1 KiB after `latency_s`, recording the most concurrent
    requests per aggregation. Until `open_at` requests wait at once it holds them all, so the
    clock starts when every processor has filled its workers, not while some still boot."""

    def __init__(self, latency_s: float = 0.05) -> None:
        self.latency_s = latency_s
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.requests = 0
        self.open_at = 0
        self.gate = asyncio.Event()
        self.opened_at = 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> GatedOrigin:
        app = web.Application()
        app.router.add_get("/{aggr}/{job}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def arm(self, open_at: int) -> None:
        """Hold answers until `open_at` requests wait at once; forget earlier counts."""
        self.open_at, self.gate = open_at, asyncio.Event()
        self.inflight.clear()
        self.max_inflight.clear()
        self.requests = 0

    async def _handle(self, request: web.Request) -> web.Response:
        aggr = request.match_info["aggr"]
        self.requests += 1
        self.inflight[aggr] += 1
        self.max_inflight[aggr] = max(self.max_inflight[aggr], self.inflight[aggr])
        try:
            if not self.gate.is_set() and self.inflight.total() >= self.open_at:
                self.opened_at = time.monotonic()
                self.gate.set()
            async with asyncio.timeout(60):
                await self.gate.wait()
            await asyncio.sleep(self.latency_s)
            return web.Response(body=b"x" * 1024)
        finally:
            self.inflight[aggr] -= 1


async def wait_succeeded(tail: EventTail, count: int, timeout_s: float) -> list[str]:
    """Follow every shard's events from where `tail` stands until `count` downloads succeeded;
    returns the ids of the jobs that succeeded (one entry per success)."""
    done = EventType.DOWNLOAD_SUCCEEDED
    try:
        await tail.wait(lambda t: t.count(done) >= count, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"only {tail.count(done)} of {count} downloads succeeded") from None
    return [job for job, events in tail.jobs.items() for t, _d, _ms in events if t == done]
