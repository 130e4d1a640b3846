"""The notifier's side (callbacks in each shard's consumer group, their retries, taking over a
gone notifier's), the event export, and what is service-wide: stats, instances, liveness."""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from downloader.events import JobEvent, parse_event
from downloader.ids import shard_of
from downloader.jobs import CallbackJob
from downloader.storage.base import StorageBase, guarded
from downloader.vocabulary import CallbackOutcome, EventType

__all__ = ["CALLBACK_GROUP", "CallbackStore", "Takeover"]

CALLBACK_GROUP = "notifiers"


@dataclass(frozen=True)
class Takeover:
    """What callback_takeover.lua did with one gone notifier in one shard: the entries it moved
    (entry id, job id) and whether the consumer, left with none, was deleted from the group."""

    consumer: str
    deleted: bool
    entries: list[tuple[str, str]]
    shard: int = 0


@guarded
class CallbackStore(StorageBase):
    # -- the callbacks streams ------------------------------------------------------------------

    async def ensure_callback_groups(self, shards: Sequence[int] | None = None) -> None:
        """The notifiers' consumer group on these shards' callbacks streams (all: None), made
        where missing, in one pipeline."""
        streams = [self.keys.callbacks(s) for s in (self.all_shards if shards is None else shards)]
        made = await self._per_shard(
            "xgroup_create", streams, CALLBACK_GROUP, id="0", mkstream=True, errors=True
        )
        for reply in made:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    async def read_callbacks(
        self, shards: Sequence[int], consumer: str, count: int, block_ms: int, after: str = ">"
    ) -> list[tuple[int, str, str]]:
        """Entries of these shards' callbacks streams (one of `shard_groups()`) for `consumer`:
        new ones (`after` ">"), or its own unsettled ones after an entry id. Returns (shard,
        entry id, job id); job id "" for an entry no longer in the stream."""
        stream_of = {self.keys.callbacks(s): s for s in shards}
        res = await self.r.xreadgroup(
            CALLBACK_GROUP,
            consumer,
            {name: after for name in stream_of},
            count=count,
            block=None if after != ">" else block_ms,
        )
        return [
            (stream_of[stream], eid, (f or {}).get("job_id", ""))
            for stream, entries in res or []
            for eid, f in entries
        ]

    async def take_over_callbacks(self, consumer: str, count: int) -> list[Takeover]:
        """Move up to `count` pending entries of gone notifiers (their liveness key lapsed) to
        `consumer`, shard by shard; delete the gone ones left with none."""
        streams = [self.keys.callbacks(s) for s in self.all_shards]
        infos = await self._per_shard("xinfo_consumers", streams, CALLBACK_GROUP, errors=True)
        others: dict[int, list[str]] = {}
        for s, info in zip(self.all_shards, infos, strict=True):
            if isinstance(info, ResponseError):
                continue  # no stream or group yet
            if isinstance(info, Exception):
                raise info
            others[s] = [c["name"] for c in info if c["name"] != consumer]
        live = set(await self.alive("notifier", sorted({n for ns in others.values() for n in ns})))
        out: list[Takeover] = []
        for s, names in others.items():
            gone = [name for name in names if name not in live]
            if not gone:
                continue
            rows = await self._run(
                "callback_takeover",
                s,
                consumer,
                CALLBACK_GROUP,
                count,
                *gone,
                keys=[self.keys.callbacks(s)],
            )
            for row in rows:
                entries = [(str(row[i]), str(row[i + 1])) for i in range(2, len(row), 2)]
                out.append(Takeover(str(row[0]), bool(int(row[1])), entries, s))
                count -= len(entries)
        return out

    async def callback_begin(
        self, job_id: str, entry_id: str = "", consumer: str = ""
    ) -> CallbackJob | None:
        """Start a delivery attempt: what the callback needs, or None if there is nothing to
        deliver: the job is gone or its callback already ended (a duplicate entry: the stream
        entry `entry_id` is acknowledged and deleted), or the entry, when given, is no longer
        pending with `consumer` (it is left to the notifier that holds it now)."""
        res = await self._run(
            "callback_begin",
            shard_of(job_id),
            job_id,
            entry_id,
            CALLBACK_GROUP,
            consumer,
            *CallbackJob.FIELDS,
            keys=[self.keys.job(job_id)],
        )
        return CallbackJob.from_values(res) if res else None

    async def callback_end(
        self,
        job_id: str,
        outcome: CallbackOutcome,
        data: Mapping[str, Any],
        entry_id: str,
        delay_ms: int,
    ) -> str:
        """Record one attempt and settle its entry; '' when the attempt was stale."""
        return str(
            await self._run(
                "callback_end",
                shard_of(job_id),
                job_id,
                outcome,
                json.dumps(data),
                entry_id,
                CALLBACK_GROUP,
                delay_ms,
                keys=[self.keys.job(job_id)],
            )
        )

    async def callback_skip(self, shard: int, entry_id: str) -> None:
        keys = [self.keys.callbacks(shard)]
        await self._run("callback_skip", shard, entry_id, CALLBACK_GROUP, keys=keys)

    async def promote_callbacks(self, shard: int, limit: int = 500) -> tuple[int, int]:
        keys = [self.keys.callback_retries(shard), self.keys.callbacks(shard)]
        moved, next_ms = await self._run("promote_callbacks", shard, limit, keys=keys)
        return int(moved), int(next_ms)

    # -- liveness -------------------------------------------------------------------------------

    async def beat(self, role: str, instance: str, ttl_ms: int) -> None:
        """The instance is alive for `ttl_ms` more."""
        await self.r.set(self.keys.alive(role, instance), "1", px=ttl_ms)

    async def forget(self, role: str, instance: str) -> None:
        """The instance stopped: others need not wait for its heartbeat to lapse."""
        await self.r.delete(self.keys.alive(role, instance))

    async def alive(self, role: str, instances: Sequence[str]) -> list[str]:
        """Which of these instances keep their liveness key."""
        if not instances:
            return []
        found = await self.r.mget([self.keys.alive(role, i) for i in instances])
        return [i for i, v in zip(instances, found, strict=True) if v is not None]

    # -- event export ---------------------------------------------------------------------------

    async def export_hold(self, shard: int, owner: str, position: str, lock_ms: int) -> bool:
        """Take or renew a shard's exporter lock, recording `position` ('' = keep); False if
        another exporter has it."""
        keys = [self.keys.export_lock(shard), self.keys.export_position(shard)]
        return bool(await self._run("export_commit", shard, owner, position, lock_ms, keys=keys))

    async def export_position(self, shard: int) -> str:
        return str(await self.r.get(self.keys.export_position(shard)) or "0-0")

    async def read_events(
        self, shard: int, after: str, count: int, block_ms: int
    ) -> list[JobEvent]:
        """Events of a shard's stream after `after`, in order."""
        res = await self.r.xread({self.keys.events(shard): after}, count=count, block=block_ms)
        return [parse_event(eid, f) for _s, entries in res or [] for eid, f in entries]

    async def recent_events(
        self, types: Sequence[EventType], limit: int, scan: int = 2000
    ) -> list[JobEvent]:
        """The newest events of the given types among the last `scan` events of the service
        (`scan` / shards of each shard's stream), newest first."""
        streams = [self.keys.events(s) for s in self.all_shards]
        per_shard = await self._per_shard("xrevrange", streams, count=-(-scan // self.shards))
        rows = heapq.merge(
            *(
                [(_newest_first(eid), eid, f) for eid, f in shard_rows if f.get("t") in types]
                for shard_rows in per_shard
            )
        )
        return [parse_event(eid, f) for _o, eid, f in list(rows)[:limit]]

    # -- instances and stats --------------------------------------------------------------------

    async def publish_stats(
        self, role: str, instance: str, stats: Mapping[str, int], ttl_ms: int
    ) -> None:
        await self._run_keyed(
            "stats",
            [self.keys.stats(role, instance), self.keys.instances],
            f"{role}:{instance}",
            ttl_ms,
            int(time.time() * 1000),
            *(x for pair in stats.items() for x in pair),
        )

    async def read_stats(self, role: str) -> list[dict[str, str]]:
        members = await self.r.zrange(self.keys.instances, 0, -1)
        wanted = [m.split(":", 1)[1] for m in members if m.startswith(f"{role}:")]
        async with self.r.pipeline(transaction=False) as p:
            for inst in wanted:
                p.hgetall(self.keys.stats(role, inst))
            res = await p.execute()
        dead = [f"{role}:{inst}" for inst, h in zip(wanted, res, strict=True) if not h]
        if dead:
            await self.r.zrem(self.keys.instances, *dead)
        return [h for h in res if h]

    async def live_instances(self) -> list[str]:
        members = await self.r.zrange(self.keys.instances, 0, -1)
        async with self.r.pipeline(transaction=False) as p:
            for m in members:
                role, inst = m.split(":", 1)
                p.exists(self.keys.stats(role, inst))
            alive = await p.execute()
        return [m for m, ok in zip(members, alive, strict=True) if ok]


def _newest_first(event_id: str) -> tuple[int, int]:
    """A sort key putting later stream ids first."""
    ms, _, seq = event_id.partition("-")
    return -int(ms), -int(seq or 0)
