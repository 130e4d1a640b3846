"""Jobs as the API sees them: placing an aggregation, accepting a job, reading one (live or
packed), its events, aborting it, retrying its callback."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from downloader.config import Config
from downloader.errors import (
    CallbackNotFailed,
    DownloadEnded,
    IdempotencyConflict,
    JobNotFound,
    NoCallback,
    ProxyConflict,
    TooManyAggregations,
)
from downloader.events import JobEvent, parse_line, unpack_lines
from downloader.ids import shard_of
from downloader.jobs import Job
from downloader.redact import url_without_password
from downloader.storage.base import StorageBase, guarded

__all__ = ["JobStore"]

DIRECTORY_TTL_MS = 30 * 86_400_000
"""How long an aggregation's shard is remembered after its last lookup."""
_PLACED_CACHE = 100_000
_PLACED_FOR_S = 3600.0  # an API refreshes what it remembers (and the key's TTL) hourly


@guarded
class JobStore(StorageBase):
    """Accepting jobs, reading them, and what the API does to them."""

    def __init__(self, client: Any, config: Config) -> None:
        super().__init__(client, config)
        self._placed: OrderedDict[str, tuple[int, float]] = OrderedDict()  # aggr -> shard, when

    # -- where an aggregation lives -------------------------------------------------------------

    async def shard_for(self, aggr_id: str) -> int:
        """The shard of an aggregation: remembered in `{dir}:aggr:<a>` for 30 days after its
        last use; a new one goes where the fewest aggregations wait, ties to where the fewest
        were placed (on a cluster: first the master, then its shard), so the load spreads over
        the shards and masters even when every queue is empty."""
        hit = self._placed.get(aggr_id)
        if hit is not None and time.monotonic() - hit[1] < _PLACED_FOR_S:
            self._placed.move_to_end(aggr_id)
            return hit[0]
        key = self.keys.directory(aggr_id)
        found = await self.r.getex(key, px=DIRECTORY_TTL_MS)  # renewed for 30 days more
        if found is None:
            choice = await self._least_loaded_shard(aggr_id)
            async with self.r.pipeline(transaction=False) as p:
                p.set(key, choice, nx=True, px=DIRECTORY_TTL_MS)
                p.get(key)  # ours, or another API's that placed it first
                placed, found = await p.execute()
            if placed:
                await self.r.hincrby(self.keys.placements, str(choice), 1)
        shard = int(found)
        self._placed[aggr_id] = (shard, time.monotonic())
        self._placed.move_to_end(aggr_id)
        if len(self._placed) > _PLACED_CACHE:
            self._placed.popitem(last=False)
        return shard

    async def _least_loaded_shard(self, aggr_id: str) -> int:
        """Where a new aggregation goes; or the shard that still holds it (its directory entry
        was lost with a failed-over master, or lapsed while its jobs waited): never two."""
        async with self.r.pipeline(transaction=False) as p:
            for s in self.all_shards:
                p.zcard(self.keys.aggregations(s))
            for s in self.all_shards:
                p.exists(self.keys.aggr(s, aggr_id))
            p.hgetall(self.keys.placements)
            *replies, placed = await p.execute()
        counts, held = replies[: self.shards], replies[self.shards :]
        if holders := [s for s, n in zip(self.all_shards, held, strict=True) if n]:
            return holders[0]
        load = {
            s: (int(n), int(placed.get(str(s), 0)))
            for s, n in zip(self.all_shards, counts, strict=True)
        }
        candidates = list(self.all_shards)
        if self.cluster:
            node_of = {s: self.r.get_node_from_key(self.keys.events(s)).name for s in candidates}
            by_node: dict[str, tuple[int, int]] = {}
            for s, (waiting, placements) in load.items():
                w, p = by_node.get(node_of[s], (0, 0))
                by_node[node_of[s]] = (w + waiting, p + placements)
            lightest = min(by_node.values())
            node = random.choice([name for name, n in by_node.items() if n == lightest])
            candidates = [s for s in candidates if node_of[s] == node]
        fewest = min(load[s] for s in candidates)
        return random.choice([s for s in candidates if load[s] == fewest])

    async def count_aggregations(self, scope: str = "") -> int:
        """Aggregations with unfinished jobs: all of them, or one tenant's."""
        keys = [self._registry(s, scope) for s in self.all_shards]
        return sum(int(n) for n in await self._per_shard("zcard", keys))

    # -- accepting a job ------------------------------------------------------------------------

    async def enqueue(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        idempotency_key: str = "",
        fingerprint: str = "",
        window_ms: int = 0,
        *,
        proxy: str | None = None,
        sealed: Mapping[str, str] | None = None,
        scope: str = "",
        max_aggregations: int = 0,
    ) -> tuple[str, bool]:
        """Accept a job (its id names its aggregation's shard): (its id, whether this replays
        an earlier request with the same Idempotency-Key). `fields` are what its job.accepted
        event shows (secrets redacted); `proxy` the aggregation's real proxy (default: fields'
        aggr_proxy) and `sealed` the real url / request headers / callback URL where fields
        redacted them; `scope` the tenant owning the aggregation, which may have at most
        `max_aggregations` alive (0: no cap; counted over every shard before a new one is
        made, so a burst of new ones can pass it by a few). Raises ProxyConflict,
        IdempotencyConflict or TooManyAggregations."""
        shard, aggr_id = shard_of(job_id), str(fields["aggr_id"])
        tied = idempotency_key and await self._tie_idempotency_key(
            idempotency_key, job_id, window_ms
        )
        keys = [
            self.keys.job(job_id),
            self.keys.aggr(shard, aggr_id),
            self.keys.ready(shard, aggr_id),
        ]
        if idempotency_key:
            keys.append(self.keys.idempotency(shard, idempotency_key))
        args = [
            job_id,
            aggr_id,
            fields["aggr_limit"],
            fields["aggr_proxy"] if proxy is None else proxy,
            json.dumps(fields, separators=(",", ":")),
            idempotency_key,
            fingerprint,
            window_ms,
            json.dumps(dict(sealed), separators=(",", ":")) if sealed else "",
            scope,
        ]
        res = await self._run_acked(
            "enqueue", shard, *args, 1 if max_aggregations else 0, keys=keys
        )
        if res[0] == "new_aggregation":
            if await self.count_aggregations(scope) >= max_aggregations:
                # refused: leave no trace (a caller at its cap sending new aggr ids or keys
                # would otherwise fill Redis with placements and ties for 30 days / 24 h)
                self._placed.pop(aggr_id, None)
                async with self.r.pipeline(transaction=False) as p:
                    p.delete(self.keys.directory(aggr_id))
                    p.hincrby(self.keys.placements, str(shard), -1)
                    await p.execute()
                if tied:
                    await self.r.delete(self.keys.idempotency_owner(idempotency_key))
                raise TooManyAggregations(max_aggregations)
            res = await self._run_acked("enqueue", shard, *args, 0, keys=keys)
        status, detail = str(res[0]), str(res[1]) if len(res) > 1 else ""
        if status == "proxy_conflict":
            raise ProxyConflict(aggr_id, url_without_password(detail))
        if status == "key_conflict":
            raise IdempotencyConflict(detail)
        # 'exists': redis-py resent the script after a lost reply, and the first run took it
        return (detail or job_id), status == "replayed"

    async def _tie_idempotency_key(self, key: str, job_id: str, window_ms: int) -> bool:
        """An Idempotency-Key is looked up in the shard of its request's aggregation; tied here
        to the job it was first used for, a key reused for an aggregation of another shard (so
        another request) is refused too. Whether this call tied it. Raises
        IdempotencyConflict."""
        owner_key = self.keys.idempotency_owner(key)
        async with self.r.pipeline(transaction=False) as p:
            p.set(owner_key, job_id, nx=True, px=max(1, window_ms))
            p.get(owner_key)
            tied, owner = await p.execute()
        if owner and shard_of(owner) != shard_of(job_id):
            raise IdempotencyConflict(owner)
        return bool(tied)

    # -- reading a job ----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        """The job's projection (folded from its events once it is packed); raises
        JobNotFound."""
        row = await self._run(
            "view",
            shard_of(job_id),
            job_id,
            keys=[self.keys.job(job_id), self.keys.done(job_id)],
        )
        if not row:
            raise JobNotFound(job_id)
        return Job.from_hash(dict(zip(row[::2], row[1::2], strict=True)))

    async def tenant_of(self, job_id: str) -> str:
        """The tenant a job was submitted by ("" when anonymous); raises JobNotFound."""
        return (await self.get_job(job_id)).tenant

    async def tenants_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Job id -> the tenant that submitted it, for the jobs that still exist."""
        found = await asyncio.gather(
            *(self.tenant_of(j) for j in job_ids), return_exceptions=True
        )  # script calls of one loop turn go in one pipeline
        out = {}
        for job_id, tenant in zip(job_ids, found, strict=True):
            if isinstance(tenant, JobNotFound):
                continue
            if isinstance(tenant, BaseException):
                raise tenant
            out[job_id] = tenant
        return out

    async def get_events(self, job_id: str) -> list[JobEvent]:
        """The job's events, oldest first; raises JobNotFound. Both keys in one MULTI (they
        share the job's slot): a /retry reviving the job between two reads would hide it."""
        async with self.r.pipeline(transaction=True) as p:
            p.lrange(self.keys.ev(job_id), 0, -1)
            p.get(self.keys.done(job_id))
            lines, packed = await p.execute()
        if not lines and packed:
            lines = unpack_lines(packed)
        if not lines:
            raise JobNotFound(job_id)
        return [parse_line(line, job_id) for line in lines]

    async def job_ids(self, shard: int) -> list[str]:
        """Every job of a shard still in its index (for `rebuild` and listings)."""
        return [str(j) for j in await self.r.zrange(self.keys.jobs(shard), 0, -1)]

    async def rebuild(self, job_id: str) -> int:
        """Refold a live job's projection from its events; returns how many (0: packed or
        gone: a packed job's projection is always folded when read)."""
        keys = [self.keys.job(job_id), self.keys.ev(job_id)]
        return int(await self._run("rebuild", shard_of(job_id), job_id, keys=keys))

    # -- acting on a job --------------------------------------------------------------------------

    async def abort(self, job_id: str, reason: str) -> str:
        """Cancel a pending or running download; returns the job.aborted event id. Raises
        JobNotFound, or DownloadEnded once the download has its outcome."""
        keys = [self.keys.job(job_id), self.keys.done(job_id)]
        res = await self._run("abort", shard_of(job_id), job_id, reason, keys=keys)
        if res[0] == "unknown":
            raise JobNotFound(job_id)
        if res[0] == "finished":
            raise DownloadEnded(job_id, str(res[1]))
        return str(res[1])

    async def requeue_callback(self, job_id: str) -> str:
        """POST /retry: a fresh round for a failed callback; returns the event id. Raises
        JobNotFound, NoCallback or CallbackNotFailed."""
        keys = [self.keys.job(job_id), self.keys.done(job_id)]
        res = await self._run("callback_requeue", shard_of(job_id), job_id, keys=keys)
        if res[0] == "unknown":
            raise JobNotFound(job_id)
        if res[0] == "no_callback":
            raise NoCallback(job_id)
        if res[0] == "not_failed":
            raise CallbackNotFailed(job_id, str(res[1]))
        return str(res[1])

    async def take_request(self, token_key: str, rate_per_second: float) -> int:
        """One request of a token against its bucket (one second deep): 0 when it may go on,
        else the ms until it may."""
        burst = max(1.0, rate_per_second)
        return int(
            await self._run_keyed("ratelimit", [self.keys.rate(token_key)], rate_per_second, burst)
        )
