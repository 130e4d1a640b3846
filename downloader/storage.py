"""The only module that talks to Redis: key names, the Lua transitions, and reads."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from downloader.autopipeline import AutoPipeline
from downloader.config import Config
from downloader.connections import FollowingMasterPool, NotReplicated, connect, could_take_over
from downloader.errors import (
    CallbackNotFailed,
    DownloadEnded,
    IdempotencyConflict,
    JobNotFound,
    NoCallback,
    ProxyConflict,
    StorageUnavailable,
    TooManyAggregations,
)
from downloader.events import JobEvent, parse_event
from downloader.jobs import CallbackJob, ClaimedJob, Job
from downloader.redact import url_without_password
from downloader.vocabulary import CallbackOutcome, DownloadOutcome, EventType

__all__ = ["CALLBACK_GROUP", "Claim", "Finish", "Keys", "Storage", "Takeover", "connect"]

CALLBACK_GROUP = "notifiers"

P = ParamSpec("P")
T = TypeVar("T")


def _outage_is_unavailable(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis connection errors and timeouts leave storage as StorageUnavailable, and nothing
    else does: callers tell an outage from a bug (or a disk error) by type."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    return call


def _guarded(cls: type[T]) -> type[T]:
    """Apply `_outage_is_unavailable` to every public coroutine method of `cls`."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _outage_is_unavailable(member))
    return cls


class Keys:
    """Every Redis key name. The Lua scripts build the same names in prelude.lua (`KEY.*`);
    tests/test_contract.py checks, against a real Redis, that each KEY has its twin here and
    that both spell it the same."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.template = f"{prefix}:%s"

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def job(self, job_id: str) -> str:
        return self._k(f"job:{{{job_id}}}")

    def job_events(self, job_id: str) -> str:
        return self._k(f"job:{{{job_id}}}:events")

    def job_events_pattern(self) -> str:
        return self._k("job:{*}:events")

    def aggr(self, aggr_id: str) -> str:
        return self._k(f"aggr:{{{aggr_id}}}")

    def ready(self, aggr_id: str) -> str:
        return self._k(f"aggr:{{{aggr_id}}}:ready")

    def inflight(self, aggr_id: str) -> str:
        return self._k(f"aggr:{{{aggr_id}}}:inflight")

    def idempotency(self, key: str) -> str:
        return self._k(f"idem:{{{key}}}")

    def tenant_aggregations(self, scope: str) -> str:
        return self._k(f"aggregations:{scope}")

    def rate(self, tenant: str) -> str:
        return self._k(f"rate:{{{tenant}}}")

    def stats(self, role: str, instance: str) -> str:
        return self._k(f"stats:{role}:{instance}")

    def alive(self, role: str, instance: str) -> str:
        """Exists while the instance's heartbeat is fresh (a TTL key; notifiers only)."""
        return self._k(f"alive:{role}:{instance}")

    @property
    def events(self) -> str:
        return self._k("events")

    @property
    def aggregations(self) -> str:
        return self._k("aggregations")

    @property
    def wake(self) -> str:
        return self._k("wake")

    @property
    def leases(self) -> str:
        return self._k("leases")

    @property
    def lease_owners(self) -> str:
        return self._k("lease-owners")

    @property
    def retries(self) -> str:
        return self._k("retries")

    @property
    def callbacks(self) -> str:
        return self._k("callbacks")

    @property
    def callback_retries(self) -> str:
        return self._k("callback-retries")

    @property
    def reap(self) -> str:
        return self._k("reap")

    @property
    def instances(self) -> str:
        return self._k("instances")

    @property
    def export_lock(self) -> str:
        return self._k("export:lock")

    @property
    def export_position(self) -> str:
        return self._k("export:position")


@dataclass(frozen=True)
class Claim:
    """What claim.lua handed out: the aggregation's proxy, how many jobs still wait, how many
    slots are still free, and the claimed jobs."""

    proxy: str
    ready_left: int
    free_slots: int
    jobs: list[ClaimedJob]


@dataclass(frozen=True)
class Takeover:
    """What callback_takeover.lua did with one gone notifier: the entries it moved (entry id,
    job id) and whether the consumer, left with none, was deleted from the group."""

    consumer: str
    deleted: bool
    entries: list[tuple[str, str]]


@dataclass(frozen=True)
class Finish:
    """What finish.lua did: whether the outcome was recorded (False: the lease was lost), and
    the next job of the aggregation if the freed slot was handed on to it."""

    recorded: bool
    next_job: ClaimedJob | None


def _claimed(row: Sequence[str | None]) -> ClaimedJob:
    """A job as claim.lua / finish.lua return it: ClaimedJob.FIELDS, then the lease token."""
    return ClaimedJob.from_values(row[:-1], str(row[-1]))


def _flat(leases: Mapping[str, str]) -> list[str]:
    """{job id: lease token} as the scripts take it: id, token, id, token..."""
    return [x for pair in leases.items() for x in pair]


@_guarded
class Storage:
    """Job transitions (each one Lua script, one round trip) and the reads the API needs.
    A Redis outage surfaces as StorageUnavailable from every public method."""

    _SCRIPTS = (
        "enqueue",
        "claim",
        "finish",
        "requeue",
        "renew",
        "promote_retries",
        "callback_begin",
        "callback_end",
        "callback_skip",
        "promote_callbacks",
        "callback_requeue",
        "callback_takeover",
        "reap",
        "rebuild",
        "export_commit",
        "abort",
        "ratelimit",
    )

    def __init__(self, client: aioredis.Redis, config: Config) -> None:
        # redis-py annotates replies as bytes | str | ...; with decode_responses=True they are str.
        self.r: Any = client
        self.keys = Keys(config.redis.key_prefix)
        self._replica_ack_ms = 1000
        self._acks_needed = 0
        self._acks_checked_at = 0.0
        self._settings = json.dumps(
            {
                "retention_ms": int(config.events.retention_hours * 3600 * 1000),
                "events_maxlen": config.events.stream_maxlen,
            }
        )
        files = resources.files("downloader") / "scripts"
        prelude = (files / "prelude.lua").read_text()
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(prelude + "\n" + (files / f"{name}.lua").read_text())
            for name in self._SCRIPTS
        }
        self._pipe = AutoPipeline(client, wait_ms=self._replica_ack_ms)

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._pipe.call(
            self._scripts[name], (*args, self.keys.template, self._settings)
        )

    async def _run_acked(self, name: str, *args: Any) -> Any:
        """`_run`, then (under Sentinel) WAIT until a replica has the write: an answer a client
        relies on (a 201) must survive a failover to that replica."""
        needed = await self._replica_acks_needed()
        try:
            return await self._pipe.call(
                self._scripts[name], (*args, self.keys.template, self._settings), acks=needed
            )
        except NotReplicated:
            self._acks_checked_at = 0.0
            self.r.connection_pool.recheck_soon()  # a master its replica left may be deposed
            raise

    async def _replica_acks_needed(self) -> int:
        """1, unless every sentinel names this very master, none is failing it over, and none
        knows a replica that could take over (up, and replicating rather than acting as a
        master): then writes are accepted, degraded, rather than all refused (its replica
        died, or this is the new master of a killed one). A deposed master that still takes
        writes never qualifies. Only under Sentinel; cached for `recheck_s`."""
        pool = self.r.connection_pool
        if not isinstance(pool, FollowingMasterPool):
            return 0
        if time.monotonic() - self._acks_checked_at < pool.recheck_s:
            return self._acks_needed
        here, name = pool.master_address, pool.service_name
        views: list[Any] = []
        for sentinel in pool.sentinel_manager.sentinels:
            with contextlib.suppress(RedisError, OSError):
                views.append(
                    (
                        (await sentinel.sentinel_masters()).get(name),
                        await sentinel.sentinel_slaves(name),
                    )
                )
        degraded = (
            here is not None
            and bool(views)
            and all(
                master is not None
                and (master["ip"], int(master["port"])) == tuple(here)
                and "failover_in_progress" not in str(master["flags"])
                and not any(could_take_over(r) for r in replicas)
                for master, replicas in views
            )
        )
        self._acks_needed, self._acks_checked_at = (0 if degraded else 1), time.monotonic()
        return self._acks_needed

    async def close(self) -> None:
        await self.r.aclose()
        pool = self.r.connection_pool
        if isinstance(pool, SentinelConnectionPool):  # its own clients of the sentinels
            await pool.sentinel_manager.aclose()

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    # -- jobs ---------------------------------------------------------------------------------

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
        """Accept a job: (its id, whether this replays an earlier request with the same
        Idempotency-Key). `fields` are what its job.accepted event shows (secrets redacted);
        `proxy` the aggregation's real proxy (default: fields' aggr_proxy) and `sealed` the real
        url / request headers (JSON) where fields redacted them; `scope` the tenant owning the
        aggregation, with at most `max_aggregations` alive (0: no cap). Raises ProxyConflict,
        IdempotencyConflict or TooManyAggregations."""
        res = await self._run_acked(
            "enqueue",
            job_id,
            fields["aggr_id"],
            fields["aggr_limit"],
            fields["aggr_proxy"] if proxy is None else proxy,
            json.dumps(fields, separators=(",", ":")),
            idempotency_key,
            fingerprint,
            window_ms,
            json.dumps(dict(sealed), separators=(",", ":")) if sealed else "",
            scope,
            max_aggregations,
        )
        status, detail = str(res[0]), str(res[1]) if len(res) > 1 else ""
        if status == "proxy_conflict":
            raise ProxyConflict(str(fields["aggr_id"]), url_without_password(detail))
        if status == "key_conflict":
            raise IdempotencyConflict(detail)
        if status == "too_many_aggregations":
            raise TooManyAggregations(int(detail))
        # 'exists': redis-py resent the script after a lost reply, and the first run took it
        return (detail or job_id), status == "replayed"

    async def abort(self, job_id: str, reason: str) -> str:
        """Cancel a pending or running download; returns the job.aborted event id. Raises
        JobNotFound, or DownloadEnded once the download has its outcome."""
        res = await self._run("abort", job_id, reason)
        if res[0] == "unknown":
            raise JobNotFound(job_id)
        if res[0] == "finished":
            raise DownloadEnded(job_id, str(res[1]))
        return str(res[1])

    async def get_job(self, job_id: str) -> Job:
        """The job's projection; raises JobNotFound."""
        row: dict[str, str] = await self.r.hgetall(self.keys.job(job_id))
        if not row:
            raise JobNotFound(job_id)
        return Job.from_hash(row)

    async def tenant_of(self, job_id: str) -> str:
        """The tenant a job was submitted by ("" when anonymous); raises JobNotFound."""
        found, tenant = await self.r.hmget(self.keys.job(job_id), ["id", "tenant"])
        if found is None:
            raise JobNotFound(job_id)
        return str(tenant or "")

    async def tenants_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Job id -> the tenant that submitted it, for the jobs that still exist."""
        async with self.r.pipeline(transaction=False) as p:
            for job_id in job_ids:
                p.hmget(self.keys.job(job_id), ["id", "tenant"])
            rows = await p.execute()
        return {j: str(t or "") for j, (found, t) in zip(job_ids, rows, strict=True) if found}

    async def take_request(self, tenant: str, rate_per_second: float) -> int:
        """One request of `tenant` against its token bucket (one second deep): 0 when it may go
        on, else the ms until it may."""
        burst = max(1.0, rate_per_second)
        return int(await self._run("ratelimit", tenant, rate_per_second, burst))

    async def get_events(self, job_id: str) -> list[JobEvent]:
        """The job's events, oldest first; raises JobNotFound."""
        entries = await self.r.xrange(self.keys.job_events(job_id))
        if not entries:
            raise JobNotFound(job_id)
        return [parse_event(eid, fields, job_id) for eid, fields in entries]

    async def rebuild(self, job_id: str) -> int:
        return int(await self._run("rebuild", job_id))

    async def scan_job_ids(self, count: int = 1000) -> list[str]:
        """Every job that has events (SCAN of the event streams: for `rebuild`, which must find
        jobs whose projection is gone; never on a request path)."""
        head, tail = self.keys.job_events("\0").split("\0")
        ids = []
        async for key in self.r.scan_iter(match=self.keys.job_events_pattern(), count=count):
            ids.append(key[len(head) : -len(tail)])
        return ids

    # -- processor ----------------------------------------------------------------------------

    async def claim(self, aggr_id: str, owner: str, lease_ms: int, count: int) -> Claim:
        """Claim up to `count` jobs of the aggregation, each under a lease of its own."""
        res = await self._run("claim", aggr_id, owner, lease_ms, count, *ClaimedJob.FIELDS)
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
        """Record a download outcome, if the lease still holds.
        With `next_owner`, the freed slot goes straight to the aggregation's next ready job,
        claimed for `next_owner` for `lease_ms` (no wake, no separate claim)."""
        res = await self._run(
            "finish",
            job_id,
            lease,
            outcome,
            json.dumps(data),
            retry_in_ms,
            next_owner,
            lease_ms,
            *ClaimedJob.FIELDS,
        )
        if res[0] != "ok":
            return Finish(False, None)
        return Finish(True, _claimed(res[2]) if len(res) > 2 else None)

    async def renew(self, lease_ms: int, leases: Mapping[str, str]) -> list[str]:
        """Extend leases ({job id: token}); returns the ids no longer held."""
        if not leases:
            return []
        return list(await self._run("renew", lease_ms, *_flat(leases)))

    async def requeue_expired(self, limit: int = 100) -> int:
        return int(await self._run("requeue", "lease expired", limit))

    async def release(self, leases: Mapping[str, str], reason: str = "shutdown") -> int:
        """Give jobs back to their queues ({job id: token}); returns how many were still held."""
        if not leases:
            return 0
        return int(await self._run("requeue", reason, len(leases), *_flat(leases)))

    async def promote_retries(self, limit: int = 500) -> tuple[int, int]:
        """Move due download retries to their queues: (moved, ms until the next one or -1)."""
        moved, next_ms = await self._run("promote_retries", limit)
        return int(moved), int(next_ms)

    async def wake_position(self) -> str:
        last = await self.r.xrevrange(self.keys.wake, count=1)
        return str(last[0][0]) if last else "0-0"

    async def read_wakes(self, after: str, block_ms: int) -> tuple[str, set[str], set[str]]:
        """Block until an aggregation may have work or a job was aborted; returns
        (new position, aggregation ids, aborted job ids)."""
        res = await self.r.xread({self.keys.wake: after}, count=1000, block=block_ms)
        aggrs: set[str] = set()
        aborted: set[str] = set()
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                after = entry_id
                aggrs.add(fields["a"])
                if "abort" in fields:
                    aborted.add(fields["abort"])
        return after, aggrs, aborted

    async def pending_aggregations(
        self, limit: int = 100_000, offset: int = 0, scope: str = ""
    ) -> list[tuple[str, int]]:
        """Aggregations with jobs in their ready queue, most waiting first, from the registry
        (no key scan): all of them, or one tenant's (`scope`)."""
        registry = self.keys.tenant_aggregations(scope) if scope else self.keys.aggregations
        rows = await self.r.zrevrangebyscore(
            registry, "+inf", 1, start=offset, num=limit, withscores=True
        )
        return [(str(name), int(size)) for name, size in rows]

    async def count_pending_aggregations(self, scope: str = "") -> int:
        registry = self.keys.tenant_aggregations(scope) if scope else self.keys.aggregations
        return int(await self.r.zcount(registry, 1, "+inf"))

    async def aggregation_details(self, aggr_ids: Sequence[str]) -> list[dict[str, Any]]:
        async with self.r.pipeline(transaction=False) as p:
            for a in aggr_ids:
                p.hgetall(self.keys.aggr(a))
                p.scard(self.keys.inflight(a))
            res = await p.execute()
        return [
            {
                "aggr_id": a,
                "limit": int(res[2 * i].get("limit", 0)),
                "jobs": int(res[2 * i].get("jobs", 0)),
                "inflight": int(res[2 * i + 1]),
            }
            for i, a in enumerate(aggr_ids)
        ]

    async def reap_due(self, limit: int = 100) -> tuple[list[str], int]:
        res = await self._run("reap", "due", limit)
        return [str(x) for x in res[:-1]], int(res[-1])

    async def reap_done(self, job_id: str) -> None:
        await self._run("reap", "done", job_id)

    async def reap_later(self, job_id: str, delay_ms: int) -> None:
        """The job's file could not be deleted now: due again in `delay_ms`."""
        await self._run("reap", "later", job_id, delay_ms)

    # -- notifier -----------------------------------------------------------------------------

    async def ensure_callback_group(self) -> None:
        try:
            await self.r.xgroup_create(self.keys.callbacks, CALLBACK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_callbacks(
        self, consumer: str, count: int, block_ms: int
    ) -> list[tuple[str, str]]:
        """New callback entries for this consumer: [(entry id, job id)]."""
        res = await self.r.xreadgroup(
            CALLBACK_GROUP, consumer, {self.keys.callbacks: ">"}, count=count, block=block_ms
        )
        return [(eid, f["job_id"]) for _s, entries in res or [] for eid, f in entries]

    async def take_over_callbacks(self, consumer: str, count: int) -> list[Takeover]:
        """Move up to `count` pending entries of gone notifiers (no liveness key) to `consumer`;
        delete the gone ones left with none."""
        rows = await self._run("callback_takeover", consumer, CALLBACK_GROUP, count)
        return [
            Takeover(
                str(row[0]),
                bool(int(row[1])),
                [(str(row[i]), str(row[i + 1])) for i in range(2, len(row), 2)],
            )
            for row in rows
        ]

    async def own_pending_callbacks(
        self, consumer: str, after: str, count: int
    ) -> list[tuple[str, str]]:
        """Entries read by `consumer` and not settled, after entry id `after`: [(entry id, job
        id)]; job id '' for an entry no longer in the stream."""
        res = await self.r.xreadgroup(
            CALLBACK_GROUP, consumer, {self.keys.callbacks: after}, count=count
        )
        return [
            (eid, (f or {}).get("job_id", "")) for _s, entries in res or [] for eid, f in entries
        ]

    async def beat(self, role: str, instance: str, ttl_ms: int) -> None:
        """The instance is alive for `ttl_ms` more."""
        await self.r.set(self.keys.alive(role, instance), "1", px=ttl_ms)

    async def forget(self, role: str, instance: str) -> None:
        """The instance stopped: others need not wait for its heartbeat to lapse."""
        await self.r.delete(self.keys.alive(role, instance))

    async def callback_begin(self, job_id: str) -> CallbackJob | None:
        """Start a delivery attempt: what the callback needs, or None if there is nothing to
        deliver (the job is gone, or its callback already ended: a duplicate entry)."""
        res = await self._run("callback_begin", job_id, *CallbackJob.FIELDS)
        return CallbackJob.from_values(res) if res else None

    async def callback_end(
        self,
        job_id: str,
        outcome: CallbackOutcome,
        data: Mapping[str, Any],
        entry_id: str,
        delay_ms: int,
    ) -> str:
        return str(
            await self._run(
                "callback_end",
                job_id,
                outcome,
                json.dumps(data),
                entry_id,
                CALLBACK_GROUP,
                delay_ms,
            )
        )

    async def callback_skip(self, entry_id: str) -> None:
        await self._run("callback_skip", entry_id, CALLBACK_GROUP)

    async def promote_callbacks(self, limit: int = 500) -> tuple[int, int]:
        moved, next_ms = await self._run("promote_callbacks", limit)
        return int(moved), int(next_ms)

    async def requeue_callback(self, job_id: str) -> str:
        """POST /retry: a fresh round for a failed callback; returns the event id. Raises
        JobNotFound, NoCallback or CallbackNotFailed."""
        res = await self._run("callback_requeue", job_id)
        if res[0] == "unknown":
            raise JobNotFound(job_id)
        if res[0] == "no_callback":
            raise NoCallback(job_id)
        if res[0] == "not_failed":
            raise CallbackNotFailed(job_id, str(res[1]))
        return str(res[1])

    # -- event export -------------------------------------------------------------------------

    async def export_hold(self, owner: str, position: str, lock_ms: int) -> bool:
        """Take or renew the exporter lock, recording `position` ('' = keep); False if taken."""
        return bool(await self._run("export_commit", owner, position, lock_ms))

    async def export_position(self) -> str:
        return str(await self.r.get(self.keys.export_position) or "0-0")

    async def read_events(
        self, after: str, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Entries of the global event stream after `after`."""
        res = await self.r.xread({self.keys.events: after}, count=count, block=block_ms)
        return [(eid, fields) for _s, entries in res or [] for eid, fields in entries]

    async def recent_events(
        self, types: Sequence[EventType], limit: int, scan: int = 2000
    ) -> list[JobEvent]:
        """The newest events of the given types among the last `scan` of the global stream."""
        rows = await self.r.xrevrange(self.keys.events, count=scan)
        return [parse_event(eid, f) for eid, f in rows if f.get("type") in types][:limit]

    # -- instances and stats ------------------------------------------------------------------

    async def publish_stats(
        self, role: str, instance: str, stats: Mapping[str, int], ttl_ms: int
    ) -> None:
        key = self.keys.stats(role, instance)
        async with self.r.pipeline(transaction=True) as p:
            p.delete(key)
            if stats:
                p.hset(key, mapping=dict(stats))
            p.pexpire(key, ttl_ms)
            p.zadd(self.keys.instances, {f"{role}:{instance}": int(time.time() * 1000)})
            await p.execute()

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
