"""Auto-pipelining of Lua script calls: the calls made in one turn of the event loop go to Redis
together, in one pipeline (one write, one connection, one round trip), instead of one each.

Under load the roles make many transitions at once (POSTs arriving together, downloads finishing
together, a batch of callbacks starting together); each separate call costs a socket write, a
pool checkout and a read wake-up on both sides. Batching within one loop turn adds no waiting:
the batch is sent from a `call_soon` callback, i.e. as soon as the coroutines that are ready
have run, and a call made alone is sent alone.

Semantics are those of separate calls: each caller gets its own reply or its own exception; a
script error fails only its caller; a connection error fails the whole batch (as it would have
failed every call); scripts are not transactional together (`transaction=False`). Scripts the
server does not know (a restarted Redis, a failover) are loaded and their calls sent again:
NOSCRIPT means the script did not run. `acks` > 0 appends one `WAIT acks` to the batch (on a
Redis Cluster one per node the acked calls went to, on the same connection, which is what WAIT
measures), and the calls that asked for it fail with NotReplicated when fewer replicas
acknowledged in time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from downloader.connections import NotReplicated

__all__ = ["AutoPipeline"]


@dataclass
class _Call:
    script: AsyncScript
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    acks: int
    future: asyncio.Future[Any] = field(repr=False)
    node: Any = None  # its node on a Redis Cluster (for its WAIT)


class AutoPipeline:
    def __init__(self, client: Any, wait_ms: int = 1000) -> None:
        self._r = client
        self._wait_ms = wait_ms
        self._cluster = isinstance(client, RedisCluster)
        self._queue: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(
        self,
        script: AsyncScript,
        keys: tuple[str, ...],
        args: tuple[Any, ...],
        acks: int = 0,
    ) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the returned future gets its reply or its exception."""
        loop = asyncio.get_running_loop()
        if not self._queue:
            loop.call_soon(self._flush)
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, acks, fut))
        return fut

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for the batches on their way (before the client closes under them)."""
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=timeout_s)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            retry = [c for c in batch if isinstance(results[id(c)][0], NoScriptError)]
            if retry:
                for script in {c.script.sha: c.script for c in retry}.values():
                    await self._load(script)
                results.update(await self._execute(retry))
        except BaseException as exc:  # the connection failed: every call failed
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for c in batch:
            reply, acked = results[id(c)]
            if c.future.done():  # its caller was cancelled: the call ran regardless
                continue
            if isinstance(reply, BaseException):
                c.future.set_exception(reply)
            elif c.acks and (acked is None or acked < c.acks):
                c.future.set_exception(
                    NotReplicated(f"the write reached {acked or 0} of {c.acks} replica(s) in time")
                )
            else:
                c.future.set_result(reply)

    async def _load(self, script: AsyncScript) -> None:
        # on a cluster, redis-py sends SCRIPT LOAD to every master (a shard's scripts run
        # where its slot is)
        await self._r.script_load(script.script)

    async def _execute(self, batch: list[_Call]) -> dict[int, tuple[Any, int | None]]:
        """One round trip (one per node on a cluster): {id(call): (reply or exception, the WAIT
        count of its node or None)}."""
        if len(batch) == 1 and not batch[0].acks:  # the common idle case: no pipeline
            c = batch[0]
            try:
                reply = await self._r.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
            except NoScriptError as exc:
                reply = exc
            return {id(c): (reply, None)}
        waits: dict[Any, int] = {}  # node (None: the one server) -> acks to wait for
        for c in batch:
            if c.acks:
                c.node = self._r.get_node_from_key(c.keys[0]) if self._cluster else None
                waits[c.node] = max(waits.get(c.node, 0), c.acks)
        async with self._r.pipeline(transaction=False) as p:
            for c in batch:  # a cluster pipeline refuses p.evalsha(); the command itself is fine
                p.execute_command("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args)
            for node, acks in waits.items():
                if node is None:
                    p.execute_command("WAIT", acks, self._wait_ms)
                else:  # grouped with that node's calls: the same connection
                    p.execute_command("WAIT", acks, self._wait_ms, target_nodes=node)
            replies = await p.execute(raise_on_error=False)
        acked = {
            node: (None if isinstance(r, BaseException) else int(r))
            for node, r in zip(waits, replies[len(batch) :], strict=True)
        }
        out = {}
        for c, reply in zip(batch, replies, strict=False):
            count = acked.get(c.node) if c.acks else None
            if c.node is not None and self._r.get_node_from_key(c.keys[0]) is not c.node:
                count = None  # redirected (MOVED/ASK): it ran elsewhere, its WAIT says nothing
            out[id(c)] = (reply, count)
        return out
