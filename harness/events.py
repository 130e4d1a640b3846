"""Following the service's events from outside: every shard's event stream, read with one
blocking XREAD over all shards on one server; on a cluster (where one XREAD cannot span shards)
one XREAD per shard without blocking, polled."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from downloader.storage import Keys
from harness.redis_nodes import StrRedis

__all__ = ["EventTail"]


class EventTail:
    """Every job's events, in order: (type, data, ms), gathered as they are appended."""

    def __init__(self, r: StrRedis, keys: Keys, cluster: bool = False) -> None:
        self.r, self.keys, self.cluster = r, keys, cluster
        self.last = {keys.events(s): "0-0" for s in range(keys.shards)}
        self.jobs: dict[str, list[tuple[str, dict[str, Any], int]]] = defaultdict(list)

    def types(self, job_id: str) -> list[str]:
        return [t for t, _d, _ts in self.jobs[job_id]]

    def of_type(self, job_id: str, etype: str) -> list[tuple[dict[str, Any], int]]:
        return [(d, ts) for t, d, ts in self.jobs[job_id] if t == etype]

    def count(self, etype: str, jobs: list[str] | None = None) -> int:
        chosen = self.jobs.values() if jobs is None else (self.jobs[j] for j in jobs)
        return sum(t == etype for events in chosen for t, _d, _ts in events)

    def all_have(self, etype: str, jobs: list[str]) -> bool:
        return all(etype in self.types(j) for j in jobs)

    async def wait(self, predicate: Callable[[EventTail], bool], timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                if not await self.read(block_ms=1000) and self.cluster:
                    # nothing new on any shard: poll again shortly rather than at once
                    await asyncio.sleep(0.05)

    async def catch_up(self) -> None:
        """Read everything appended so far."""
        while await self.read(block_ms=None):
            pass

    async def last_id(self) -> dict[str, str]:
        """Where every shard's stream ends now (to follow only what comes next)."""
        ends = {}
        for stream in self.last:
            last = await self.r.xrevrange(stream, count=1)
            ends[stream] = str(last[0][0]) if last else "0-0"
        return ends

    async def read(self, block_ms: int | None) -> int:
        groups = [[s] for s in self.last] if self.cluster else [list(self.last)]
        read = 0
        for group in groups:
            res = await self.r.xread(
                {s: self.last[s] for s in group},
                count=1000,
                block=block_ms if len(groups) == 1 else None,
            )
            for stream, entries in res or []:
                for entry_id, f in entries:
                    self.last[stream] = entry_id
                    ms = int(entry_id.split("-")[0])
                    self.jobs[f["j"]].append((f["t"], json.loads(f.get("d") or "{}"), ms))
                    read += 1
        return read
