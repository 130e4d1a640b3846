"""What every part of storage shares: the client, the scripts and how they are run, the shards,
and what makes a write a client may rely on safe (WAIT for a replica)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, ParamSpec, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterError, RedisError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from downloader.autopipeline import AutoPipeline
from downloader.config import Config
from downloader.connections import FollowingMasterPool, NotReplicated, could_take_over
from downloader.errors import StorageUnavailable
from downloader.storage.keys import Keys

__all__ = ["SCRIPTS", "StorageBase", "guarded"]

P = ParamSpec("P")
T = TypeVar("T")

SCRIPTS = (
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
    "stats",
    "trim",
    "view",
)


OUTAGES = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,  # a cluster failing over: CLUSTERDOWN, a redirection that found no end
    TryAgainError,  # a multi-key command on a slot that is moving
    SlotNotCoveredError,
)
"""What Redis answers while it (or the part of a cluster holding a key) is not there."""

CLUSTER_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)

LAYOUT_MODEL = "sharded-1"
"""The data model's name in `{meta}:layout` (the model before it recorded none)."""


def _outage_is_unavailable(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis connection errors and timeouts leave storage as StorageUnavailable, and nothing
    else does: callers tell an outage from a bug (or a disk error) by type. A cancelled task
    gets its cancellation back: redis-py can turn one that lands mid-reconnect into a
    connection error, which every caller that retries outages would swallow."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except OUTAGES as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    return call


def guarded(cls: type[T]) -> type[T]:
    """Apply `_outage_is_unavailable` to every public coroutine method `cls` defines."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _outage_is_unavailable(member))
    return cls


@guarded
class StorageBase:
    """The client, the scripts and the shards. A script runs on one shard: its KEYS[1] is that
    shard's event stream, which routes it (on a cluster) and names every other key it builds."""

    def __init__(self, client: Any, config: Config) -> None:
        # redis-py annotates replies as bytes | str | ...; with decode_responses=True they are str.
        self.r: Any = client
        self.cluster = isinstance(client, RedisCluster)
        self.shards = config.redis.shards
        self.keys = Keys(config.redis.key_prefix, self.shards)
        self.retention_ms = int(config.events.retention_hours * 3600 * 1000)
        self._replica_ack_ms = 1000
        self._acks_needed = 0
        self._acks_checked_at = 0.0
        self._node_acks: dict[str, tuple[int, float]] = {}  # cluster node -> (acks, checked at)
        self._settings = json.dumps(
            {"retention_ms": self.retention_ms, "events_maxlen": config.events.stream_maxlen}
        )
        files = resources.files("downloader") / "scripts"
        prelude = (files / "prelude.lua").read_text()
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(prelude + "\n" + (files / f"{name}.lua").read_text())
            for name in SCRIPTS
        }
        self._pipe = AutoPipeline(client, wait_ms=self._replica_ack_ms)

    @property
    def all_shards(self) -> range:
        return range(self.shards)

    def shard_groups(self) -> list[list[int]]:
        """Shards whose streams one blocking read can cover: all of them on one server, one by
        one on a cluster (a command's keys must share a slot there)."""
        if self.cluster:
            return [[s] for s in self.all_shards]
        return [list(self.all_shards)]

    def _registry(self, shard: int, scope: str) -> str:
        """A shard's registry of aggregations with jobs: all of them, or one tenant's."""
        if scope:
            return self.keys.tenant_aggregations(shard, scope)
        return self.keys.aggregations(shard)

    async def _per_shard(
        self, command: str, keys: Sequence[str], *args: Any, errors: bool = False, **kw: Any
    ) -> list[Any]:
        """One keyed command per key (`args`, `kw` its other arguments), in one pipeline: one
        round trip per node. `errors`: an error reply comes back in its place, not raised."""
        async with self.r.pipeline(transaction=False) as p:
            for key in keys:
                getattr(p, command)(key, *args, **kw)
            return list(await p.execute(raise_on_error=not errors))

    async def _run(self, name: str, shard: int, *args: Any, keys: Sequence[str] = ()) -> Any:
        """Run script `name` on `shard`. KEYS: the shard's event stream, `keys` (those of the
        job or aggregation it is called for), every fixed key of the shard, its fence."""
        return await self._call(name, self._keys_of(shard, keys), args)

    def _keys_of(self, shard: int, keys: Sequence[str]) -> tuple[str, ...]:
        return (self.keys.events(shard), *keys, *self.keys.fixed(shard), self.keys.fence(shard))

    async def _run_keyed(self, name: str, keys: Sequence[str], *args: Any) -> Any:
        """Run a script that is not about a shard (its own KEYS)."""
        return await self._call(name, tuple(keys), args)

    async def _call(
        self, name: str, keys: tuple[str, ...], args: tuple[Any, ...], acks: int = 0
    ) -> Any:
        """One script call. On a cluster, a call refused because its slot is moving (TRYAGAIN,
        or ASK/MOVED redirections that found no end) or its master is failing over (CLUSTERDOWN)
        never ran: it is sent again, 50 ms doubling, for up to ~3 s, before it counts as an
        outage."""
        script, full_args = self._scripts[name], (*args, self._settings)
        for delay in CLUSTER_RETRY_DELAYS if self.cluster else ():
            try:
                return await self._pipe.call(script, keys, full_args, acks=acks)
            except (ClusterError, TryAgainError):
                await asyncio.sleep(delay)
        return await self._pipe.call(script, keys, full_args, acks=acks)

    async def _run_acked(self, name: str, shard: int, *args: Any, keys: Sequence[str] = ()) -> Any:
        """`_run`, then WAIT until a replica has the write (under Sentinel or on a cluster):
        an answer a client relies on (a 201) must survive a failover to that replica."""
        needed = await self._replica_acks_needed(self.keys.events(shard))
        try:
            return await self._call(name, self._keys_of(shard, keys), args, acks=needed)
        except NotReplicated:
            self._acks_checked_at = 0.0
            self._node_acks.clear()
            if not self.cluster and isinstance(self.r.connection_pool, FollowingMasterPool):
                self.r.connection_pool.recheck_soon()  # a master its replica left may be deposed
            raise

    async def _replica_acks_needed(self, key: str) -> int:
        if self.cluster:
            return await self._cluster_acks_needed(key)
        return await self._sentinel_acks_needed()

    async def _cluster_acks_needed(self, key: str) -> int:
        """1 while the master of `key`'s slot has a replica attached, else 0: writes go on,
        degraded, rather than being refused while the cluster has no replica to fail over to
        (its replica died, or it is the new master of a killed one). Cached for 0.5 s."""
        node = self.r.get_node_from_key(key)
        acks, at = self._node_acks.get(node.name, (0, 0.0))
        if time.monotonic() - at < 0.5:
            return acks
        acks = 1
        with contextlib.suppress(RedisError, OSError):
            info = await self.r.info("replication", target_nodes=node)
            acks = 1 if int(info.get("connected_slaves", 0)) > 0 else 0
        self._node_acks[node.name] = (acks, time.monotonic())
        return acks

    async def _sentinel_acks_needed(self) -> int:
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

    async def layout_problem(self) -> str | None:
        """Why this process must not serve this Redis, or None. The first process records the
        layout (`{meta}:layout`); a process with another `redis.shards` would strand every job,
        and so would work left unfinished by the data model before shards."""
        key = self.keys.layout
        await self.r.hsetnx(key, "shards", self.shards)
        await self.r.hsetnx(key, "model", LAYOUT_MODEL)
        recorded = int(await self.r.hget(key, "shards"))
        if recorded != self.shards:
            return (
                f"redis.shards is {self.shards}, but the data in this Redis is laid out in "
                f"{recorded} shards: set redis.shards to {recorded} (it is fixed for the life "
                "of the data)"
            )
        if self.cluster:  # the earlier data model never ran on a cluster
            return None
        left = await self._earlier_model_work()
        if left:
            return (
                f"this Redis holds unfinished work of the earlier data model ({left}): finish "
                "it with the earlier version first (README, Upgrades)"
            )
        return None

    async def _earlier_model_work(self) -> str:
        """What the data model before shards left unfinished under this prefix: its global
        queues (`<prefix>:aggregations`, `:leases`, ...)."""
        old = f"{self.keys.prefix}:"
        async with self.r.pipeline(transaction=False) as p:
            for name in ("aggregations", "leases", "retries", "callback-retries", "reap"):
                p.zcard(old + name)
            p.xlen(old + "callbacks")
            counts = [int(n) for n in await p.execute()]
        labels = (
            "aggregations with jobs waiting",
            "downloads running",
            "downloads waiting for a retry",
            "callbacks waiting for a retry",
            "files waiting for deletion",
            "callbacks to deliver",
        )
        return ", ".join(f"{n} {label}" for n, label in zip(counts, labels, strict=True) if n)

    async def close(self) -> None:
        await self._pipe.drain()
        await self.r.aclose()
        if not self.cluster:
            pool = self.r.connection_pool
            if isinstance(pool, SentinelConnectionPool):  # its own clients of the sentinels
                await pool.sentinel_manager.aclose()

    async def ping(self) -> bool:
        if self.cluster:  # every master answers
            replies = await self.r.ping(target_nodes=RedisCluster.PRIMARIES)
            return bool(replies) and all(
                replies.values() if isinstance(replies, dict) else [replies]
            )
        return bool(await self.r.ping())
