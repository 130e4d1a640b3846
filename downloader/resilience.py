"""Keep a background loop alive through Redis outages: back off, log once, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from downloader.log import get_logger

__all__ = ["REDIS_DOWN", "forever"]

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
log = get_logger(__name__)


async def forever(
    name: str, step: Callable[[], Awaitable[None]], stopping: Callable[[], bool]
) -> None:
    """Run `step` until `stopping()`; on a Redis outage wait 50 ms doubling to 2 s, then resume."""
    delay = 0.05
    down = False
    while not stopping():
        try:
            await step()
            if down:
                log.info("redis reachable again", loop=name)
                down = False
            delay = 0.05
        except REDIS_DOWN as exc:
            if not down:
                log.warning("redis unreachable, backing off", loop=name, error=str(exc))
                down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
