"""The processor's side: finding work (wakes, registries), claiming it under leases, recording
outcomes, and the timers (due retries, expired leases, the reaper, trimming)."""

from __future__ import annotations

import asyncio
import heapq
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from downloader.ids import shard_of
from downloader.jobs import ClaimedJob
from downloader.storage.base import StorageBase, guarded
from downloader.vocabulary import DownloadOutcome

__all__ = ["Claim", "Finish", "Wakes", "WorkStore"]


@dataclass(frozen=True)
class Claim:
    """What claim.lua handed out: the aggregation's proxy, how many jobs still wait, how many
    slots are still free, and the claimed jobs."""

    proxy: str
    ready_left: int
    free_slots: int
    jobs: list[ClaimedJob]


@dataclass(frozen=True)
class Finish:
    """What finish.lua did: whether the outcome was recorded (False: the lease was lost), and
    the next job of the aggregation if the freed slot was handed on to it."""

    recorded: bool
    next_job: ClaimedJob | None


@dataclass(frozen=True)
class Wakes:
    """What a read of wake streams brought: aggregations that may have work (id -> shard) and
    jobs aborted while running."""

    aggregations: dict[str, int]
    aborted: set[str]


def _claimed(row: Sequence[str | None]) -> ClaimedJob:
    """A job as claim.lua / finish.lua return it: ClaimedJob.FIELDS, then the lease token."""
    return ClaimedJob.from_values(row[:-1], str(row[-1]))


def by_shard(job_ids: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for job_id in job_ids:
        out[shard_of(job_id)].append(job_id)
    return out


@guarded
class WorkStore(StorageBase):
    # -- claiming and recording ---------------------------------------------------------------

    async def claim(self, shard: int, aggr_id: str, owner: str, lease_ms: int, count: int) -> Claim:
        """Claim up to `count` jobs of the aggregation, each under a lease of its own."""
        keys = [
            self.keys.aggr(shard, aggr_id),
            self.keys.ready(shard, aggr_id),
            self.keys.inflight(shard, aggr_id),
        ]
        res = await self._run(
            "claim", shard, aggr_id, owner, lease_ms, count, *ClaimedJob.FIELDS, keys=keys
        )
        return Claim(str(res[0]), int(res[1]), int(res[2]), [_claimed(j) for j in res[3:]])

    async def finish(
        self,
        job_id: str,
        lease: str,
        outcome: DownloadOutcome,
        data: Mapping[str, Any],
        retry_in_ms: int = 0,
        next_owner: str = "",
        lease_ms: int = 0,
    ) -> Finish:
        """Record a download outcome, if the lease still holds. With `next_owner`, the freed
        slot goes straight to the aggregation's next ready job, claimed for `next_owner` for
        `lease_ms` (no wake, no separate claim)."""
        shard = shard_of(job_id)
        res = await self._run(
            "finish",
            shard,
            job_id,
            lease,
            outcome,
            json.dumps(data),
            retry_in_ms,
            next_owner,
            lease_ms,
            *ClaimedJob.FIELDS,
            keys=[self.keys.job(job_id), self.keys.lease_owners(shard)],
        )
        if res[0] != "ok":
            return Finish(False, None)
        return Finish(True, _claimed(res[2]) if len(res) > 2 else None)

    async def renew(self, lease_ms: int, leases: Mapping[str, str]) -> list[str]:
        """Extend leases ({job id: token}); returns the ids no longer held."""
        calls = [
            self._run(
                "renew",
                shard,
                lease_ms,
                *(x for j in ids for x in (j, leases[j])),
                keys=[self.keys.lease_owners(shard), self.keys.leases(shard)],
            )
            for shard, ids in by_shard(leases).items()
        ]
        return [str(j) for lost in await asyncio.gather(*calls) for j in lost]

    async def requeue_expired(self, shard: int, limit: int = 100) -> int:
        """Hand jobs whose lease expired (their processor died) back to their queues."""
        keys = [self.keys.leases(shard), self.keys.lease_owners(shard)]
        return int(await self._run("requeue", shard, "lease expired", limit, keys=keys))

    async def release(self, leases: Mapping[str, str], reason: str = "shutdown") -> int:
        """Give jobs back to their queues ({job id: token}); returns how many were still held."""
        calls = [
            self._run(
                "requeue",
                shard,
                reason,
                len(ids),
                *(x for j in ids for x in (j, leases[j])),
                keys=[self.keys.leases(shard), self.keys.lease_owners(shard)],
            )
            for shard, ids in by_shard(leases).items()
        ]
        return sum(int(n) for n in await asyncio.gather(*calls))

    async def promote_retries(self, shard: int, limit: int = 500) -> tuple[int, int]:
        """Move due download retries to their queues: (moved, ms until the next one or -1)."""
        keys = [self.keys.retries(shard)]
        moved, next_ms = await self._run("promote_retries", shard, limit, keys=keys)
        return int(moved), int(next_ms)

    # -- finding work ---------------------------------------------------------------------------

    async def wake_positions(self, shards: Sequence[int]) -> dict[int, str]:
        """Where each shard's wake stream ends now (read from there on)."""
        tails = await self._per_shard("xrevrange", [self.keys.wake(s) for s in shards], count=1)
        return {s: str(t[0][0]) if t else "0-0" for s, t in zip(shards, tails, strict=True)}

    async def read_wakes(
        self, positions: dict[int, str], block_ms: int
    ) -> tuple[dict[int, str], Wakes]:
        """Block until an aggregation of these shards may have work or a job was aborted;
        `positions` must be one of `shard_groups()`. Returns the new positions and the wakes."""
        stream_of = {self.keys.wake(s): s for s in positions}
        res = await self.r.xread(
            {self.keys.wake(s): pos for s, pos in positions.items()}, count=1000, block=block_ms
        )
        moved = dict(positions)
        wakes = Wakes({}, set())
        for stream, entries in res or []:
            shard = stream_of[stream]
            for entry_id, fields in entries:
                moved[shard] = entry_id
                wakes.aggregations[fields["a"]] = shard
                if "abort" in fields:
                    wakes.aborted.add(fields["abort"])
        return moved, wakes

    async def pending_aggregations(
        self, limit: int = 100_000, offset: int = 0, scope: str = ""
    ) -> list[tuple[str, int, int]]:
        """Aggregations with jobs in their ready queue, most waiting first, from the shards'
        registries (no key scan): all of them, or one tenant's. Returns (aggr id, waiting,
        shard)."""
        want = offset + limit
        registries = [self._registry(s, scope) for s in self.all_shards]
        per_shard = await self._per_shard(
            "zrevrangebyscore", registries, "+inf", 1, start=0, num=want, withscores=True
        )
        merged = heapq.merge(
            *(
                [(-int(size), str(name), s) for name, size in rows]
                for s, rows in zip(self.all_shards, per_shard, strict=True)
            )
        )
        return [(name, -neg, s) for neg, name, s in list(merged)[offset:want]]

    async def count_pending_aggregations(self, scope: str = "") -> int:
        registries = [self._registry(s, scope) for s in self.all_shards]
        return sum(int(n) for n in await self._per_shard("zcount", registries, 1, "+inf"))

    async def aggregation_details(self, aggrs: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
        """Limit, unfinished jobs and downloads in flight of each (aggr id, shard)."""
        async with self.r.pipeline(transaction=False) as p:
            for a, s in aggrs:
                p.hgetall(self.keys.aggr(s, a))
                p.scard(self.keys.inflight(s, a))
            res = await p.execute()
        return [
            {
                "aggr_id": a,
                "limit": int(res[2 * i].get("limit", 0)),
                "jobs": int(res[2 * i].get("jobs", 0)),
                "inflight": int(res[2 * i + 1]),
            }
            for i, (a, _s) in enumerate(aggrs)
        ]

    # -- the reaper and trimming ----------------------------------------------------------------

    async def reap_due(self, shard: int, limit: int = 100) -> tuple[list[str], int]:
        res = await self._run("reap", shard, "due", limit, keys=[self.keys.reap(shard)])
        return [str(x) for x in res[:-1]], int(res[-1])

    async def reap_done(self, job_id: str) -> None:
        shard = shard_of(job_id)
        await self._run("reap", shard, "done", job_id, keys=[self.keys.reap(shard)])

    async def reap_later(self, job_id: str, delay_ms: int) -> None:
        """The job's file could not be deleted now: due again in `delay_ms`."""
        shard = shard_of(job_id)
        await self._run("reap", shard, "later", job_id, delay_ms, keys=[self.keys.reap(shard)])

    async def trim(self, shard: int, window_ms: int, now_ms: int) -> tuple[int, int, bool]:
        """Keep the shard's event stream to the last `window_ms` and its job index to the jobs
        that still exist: (stream entries, index entries) removed, and whether the trim may
        have dropped events the Kafka export had not sent."""
        oldest_kept = now_ms - self.retention_ms
        trimmed, removed, unexported = await self._run(
            "trim",
            shard,
            f"{now_ms - window_ms}-0",
            oldest_kept,
            keys=[self.keys.jobs(shard)],
        )
        return int(trimmed), int(removed), bool(unexported)
