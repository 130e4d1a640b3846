"""Connections to Redis: a plain server, or the master a group of Sentinels names (followed
through failovers, which redis-py alone does not do safely)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from downloader.config import Config

__all__ = ["FollowingMasterPool", "NotReplicated", "connect", "could_take_over"]


class NotReplicated(RedisConnectionError):
    """A write no replica confirmed in time: a failover could lose it, so it is answered like
    an outage (503 + Retry-After) and the client retries it with its Idempotency-Key."""


class SerializedSentinel(Sentinel):
    """redis-py's Sentinel with master discovery serialized. Its `discover_master` moves the
    sentinel that answered to the front of `self.sentinels` by an index taken before an await;
    concurrent calls (every loop reconnecting after a failover) then duplicate one sentinel in
    the list and drop another, which is never asked again, nor closed."""

    _discovering: asyncio.Lock | None = None

    async def discover_master(self, service_name: str) -> Any:
        if self._discovering is None:
            self._discovering = asyncio.Lock()
        async with self._discovering:
            return await super().discover_master(service_name)


def could_take_over(replica: Mapping[str, Any]) -> bool:
    """A replica a sentinel could promote holding our writes: up, and replicating."""
    down = replica["is_sdown"] or replica["is_odown"] or replica["is_disconnected"]
    return not down and replica.get("role-reported") == "slave"


class FollowingMasterPool(SentinelConnectionPool):
    """A Sentinel pool that follows a failover even while the old master stays up.

    redis-py asks the sentinels for the master only when it opens a connection, and its asyncio
    pool never drops a connection to a former master (`owns_connection` is not consulted on
    release). Sentinel reconfigures a reachable old master only ~10 s after the switch; until
    then it takes our writes, and its resync from the new master throws them away. So this pool
    asks the sentinels again at most every `recheck_s`, and never hands out or keeps a
    connection to an address that is no longer the master's."""

    recheck_s = 0.5

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._checked_at = 0.0

    def recheck_soon(self) -> None:
        self._checked_at = 0.0

    def _stale(self, connection: Any) -> bool:
        return self.master_address is not None and (
            (connection.host, connection.port) != tuple(self.master_address)
        )

    async def get_connection(self, *_deprecated: Any, **_options: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            # on a change it closes idle connections; if no sentinel answers, the connection will
            with contextlib.suppress(RedisError, OSError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        connection = await super().get_connection()  # type: ignore[no-untyped-call]
        if self._stale(connection):
            await connection.disconnect()
            await connection.connect()  # asks the sentinels for the master
        return connection

    async def release(self, connection: Any) -> None:
        if self._stale(connection):
            await connection.disconnect()
        await super().release(connection)


def connect(config: Config) -> Any:
    """A client for the configured Redis: one server, the master a group of Sentinels names,
    or a Redis Cluster (redis-py's cluster client: it follows MOVED and ASK, and a failover)."""
    rc = config.redis
    # Fail fast when Redis is down (the API answers 503 within about a second, loops back off
    # on their own) instead of redis-py's default of 10 retries with up to 10 s waits.
    common: dict[str, Any] = {
        "db": rc.db,
        "password": rc.password,
        "decode_responses": True,
        "socket_connect_timeout": 2,
        "socket_timeout": 15,  # above every XREAD BLOCK we issue (at most 5 s)
        "retry": Retry(ExponentialBackoff(cap=0.25, base=0.02), 3),
        "health_check_interval": 30,
    }
    if rc.cluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in rc.seeds],
            password=rc.password,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=15,
            # a command whose node failed (a master lost mid-run): the client asks the cluster
            # for its slots again and retries, 10 times over ~3 s, before it gives up
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.02), 10),
            max_connections=1024,
            # the shards of the masters left keep working while one master is down
            require_full_coverage=False,
            # a MOVED updates the one slot; the default (rebuild the whole map every 5th MOVED)
            # closes every connection under the commands in flight on them (redis-py 8.1)
            reinitialize_steps=0,
        )
    if rc.sentinels:
        sentinel = SerializedSentinel(rc.sentinels, **common)  # type: ignore[no-untyped-call]
        return cast(
            aioredis.Redis,
            sentinel.master_for(rc.master, connection_pool_class=FollowingMasterPool),
        )
    host, port = rc.server
    # redis-py 8 caps a pool at 100 connections and fails the 101st command ("Too many
    # connections"); a blocking pool makes a burst wait for a free connection instead.
    pool = aioredis.BlockingConnectionPool(
        host=host, port=port, max_connections=1024, timeout=5, **common
    )
    return aioredis.Redis.from_pool(pool)
