"""Keep a background loop alive through Redis outages: back off, log once, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from downloader.errors import StorageUnavailable
from downloader.log import get_logger

__all__ = ["forever"]

log = get_logger(__name__)


async def forever(
    name: str, step: Callable[[], Awaitable[None]], stopping: Callable[[], bool]
) -> None:
    """Run `step` until `stopping()`; on a Redis outage wait 50 ms doubling to 2 s, then resume.
    Any other error is a bug: logged with its traceback, then the loop goes on after 1 s."""
    delay = 0.05
    down = False
    task = asyncio.current_task()
    while not stopping():
        if task is not None and task.cancelling():
            # cancelled, and a step swallowed it (redis-py may absorb a cancel that lands while
            # it reconnects, and go on): without this a loop whose stopping() stays False
            # (the heartbeat) would never end, and its owner would wait for it forever
            raise asyncio.CancelledError
        try:
            await step()
            if down:
                log.info("redis reachable again", loop=name)
                down = False
            delay = 0.05
        except StorageUnavailable as exc:
            if task is not None and task.cancelling():
                # storage gives a cancelled task its cancellation back (storage.base); this
                # covers an outage raised where no storage call saw the cancel (a child task)
                raise asyncio.CancelledError from exc
            if not down:
                log.warning("redis unreachable, backing off", loop=name, error=str(exc))
                down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except Exception as exc:  # a bug, or e.g. a disk error: say so, and keep the loop alive
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc
            log.exception("background loop failed; resuming in 1 s", loop=name)
            await asyncio.sleep(1.0)
