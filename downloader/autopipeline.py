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
NOSCRIPT means the script did not run. `acks` > 0 appends one `WAIT acks` to the batch, and the
calls that asked for it fail with NotReplicated when fewer replicas acknowledged in time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from downloader.connections import NotReplicated

__all__ = ["AutoPipeline"]


@dataclass
class _Call:
    script: AsyncScript
    args: tuple[Any, ...]
    acks: int
    future: asyncio.Future[Any] = field(repr=False)


class AutoPipeline:
    def __init__(self, client: Any, wait_ms: int = 1000) -> None:
        self._r = client
        self._wait_ms = wait_ms
        self._queue: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(
        self, script: AsyncScript, args: tuple[Any, ...], acks: int = 0
    ) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the returned future gets its reply or its exception."""
        loop = asyncio.get_running_loop()
        if not self._queue:
            loop.call_soon(self._flush)
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, args, acks, fut))
        return fut

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies, acked = await self._execute(batch)
            results = {id(c): (r, acked) for c, r in zip(batch, replies, strict=True)}
            retry = [c for c in batch if isinstance(results[id(c)][0], NoScriptError)]
            if retry:
                for script in {c.script.sha: c.script for c in retry}.values():
                    await self._r.script_load(script.script)
                replies, acked = await self._execute(retry)
                results.update({id(c): (r, acked) for c, r in zip(retry, replies, strict=True)})
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
            elif acked is not None and acked < c.acks:
                c.future.set_exception(
                    NotReplicated(f"the write reached {acked} of {c.acks} replica(s) in time")
                )
            else:
                c.future.set_result(reply)

    async def _execute(self, batch: list[_Call]) -> tuple[list[Any], int | None]:
        """One round trip: (a reply or exception per call, the WAIT count or None)."""
        acks = max(c.acks for c in batch)
        if len(batch) == 1 and acks == 0:  # the common idle case: a plain command, no pipeline
            try:
                return [await self._r.evalsha(batch[0].script.sha, 0, *batch[0].args)], None
            except NoScriptError as exc:
                return [exc], None
        async with self._r.pipeline(transaction=False) as p:
            for c in batch:
                p.evalsha(c.script.sha, 0, *c.args)
            if acks:
                p.execute_command("WAIT", acks, self._wait_ms)
            replies = await p.execute(raise_on_error=False)
        if acks:
            return replies[:-1], int(replies[-1])
        return replies, None
