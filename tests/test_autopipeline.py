"""Auto-pipelining against a real Redis: calls of one loop turn share one write, and each
caller still gets its own reply or error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from downloader.autopipeline import AutoPipeline
from downloader.connections import NotReplicated
from downloader.embedded import EmbeddedRedis
from harness.redis_nodes import StrRedis

ECHO = "return ARGV[1]"
FAIL_ON_BOOM = "if ARGV[1] == 'boom' then return redis.error_reply('BOOM') end return ARGV[1]"


class CountingConnection(Connection):
    """A real connection that counts its writes to the socket (one per round trip)."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[StrRedis]:
    pool = aioredis.ConnectionPool(
        host=redis_server.host,
        port=redis_server.port,
        decode_responses=True,
        connection_class=CountingConnection,
    )
    c = aioredis.Redis.from_pool(pool)
    await c.ping()
    yield c
    await c.aclose()


async def writes_during(coro: Any) -> tuple[Any, int]:
    before = CountingConnection.writes
    result = await coro
    return result, CountingConnection.writes - before


async def test_calls_of_one_turn_share_one_write(client: StrRedis) -> None:
    pipe = AutoPipeline(client)
    echo = client.register_script(ECHO)
    await client.script_load(ECHO)
    replies, writes = await writes_during(
        asyncio.gather(*(pipe.call(echo, (), (f"v{i}",)) for i in range(50)))
    )
    assert replies == [f"v{i}" for i in range(50)]
    assert writes == 1


async def test_a_lone_call_is_sent_alone(client: StrRedis) -> None:
    pipe = AutoPipeline(client)
    echo = client.register_script(ECHO)
    await client.script_load(ECHO)
    assert await writes_during(pipe.call(echo, (), ("one",))) == ("one", 1)


async def test_a_script_error_fails_only_its_caller(client: StrRedis) -> None:
    pipe = AutoPipeline(client)
    script = client.register_script(FAIL_ON_BOOM)
    replies = await asyncio.gather(
        pipe.call(script, (), ("a",)),
        pipe.call(script, (), ("boom",)),
        pipe.call(script, (), ("c",)),
        return_exceptions=True,
    )
    assert replies[0] == "a" and replies[2] == "c"
    assert isinstance(replies[1], ResponseError) and "BOOM" in str(replies[1])


async def test_unknown_scripts_are_loaded_and_their_calls_sent_again(
    client: StrRedis,
) -> None:
    """After SCRIPT FLUSH (a restarted Redis, a failover) every call still runs exactly once."""
    pipe = AutoPipeline(client)
    incr = client.register_script("return redis.call('INCR', ARGV[1])")
    await client.delete("ap:n")
    await client.script_flush()
    replies = await asyncio.gather(*(pipe.call(incr, (), ("ap:n",)) for _ in range(10)))
    assert sorted(replies) == list(range(1, 11))
    assert await client.get("ap:n") == "10"
    await client.script_flush()
    assert await pipe.call(incr, (), ("ap:n",)) == 11  # the lone-call path recovers too


async def test_a_cancelled_caller_leaves_the_others_alone(client: StrRedis) -> None:
    pipe = AutoPipeline(client)
    echo = client.register_script(ECHO)
    first, second = pipe.call(echo, (), ("x",)), pipe.call(echo, (), ("y",))
    first.cancel()
    assert await second == "y"


async def test_wait_without_a_replica_fails_only_the_calls_that_asked(
    client: StrRedis,
) -> None:
    pipe = AutoPipeline(client, wait_ms=20)
    echo = client.register_script(ECHO)
    results: tuple[Any, ...] = await asyncio.gather(
        pipe.call(echo, (), ("plain",)),
        pipe.call(echo, (), ("acked",), acks=1),
        return_exceptions=True,
    )
    plain, acked = results
    assert plain == "plain"
    assert isinstance(acked, NotReplicated)


async def test_a_dead_server_fails_every_call_of_the_batch() -> None:
    from harness.servers import free_port

    c = aioredis.Redis(
        port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0), retry_on_error=[]
    )
    pipe = AutoPipeline(c)
    echo = c.register_script(ECHO)
    replies = await asyncio.gather(
        *(pipe.call(echo, (), (str(i),)) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, OSError | aioredis.ConnectionError) for r in replies), replies
    await c.aclose()
