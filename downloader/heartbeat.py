"""Each running process publishes its stats under its instance id; the API sums them. A
notifier also keeps a liveness key, so the others can tell when it is gone."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping

from downloader.errors import StorageUnavailable
from downloader.storage import Storage

__all__ = ["Liveness", "new_instance_id", "publish_stats"]


def new_instance_id() -> str:
    """`host-pid-random`: unique per process start, readable on the dashboard."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def publish_stats(
    storage: Storage,
    role: str,
    instance: str,
    snapshot: Callable[[], Mapping[str, int]],
    interval_ms: int,
) -> None:
    """One publication, then wait `interval_ms`; the entry lives three intervals."""
    await storage.publish_stats(role, instance, snapshot(), ttl_ms=3 * interval_ms)
    await asyncio.sleep(interval_ms / 1000)


class Liveness:
    """An instance's heartbeat: every `interval_ms` it sets its key to live `dead_after_ms`.
    Whoever finds the key missing may take the instance for gone.

    Judging others is safe only while our own beats go through: after an outage of Redis every
    key may have lapsed, the live instances' too, so `may_judge_others()` stays False for one
    `dead_after_ms` after a failed beat, long enough for every live instance to beat again. A
    fresh instance waits the same after its first beat: it may be starting right after such an
    outage, while the others are still backing off."""

    def __init__(
        self, storage: Storage, role: str, instance: str, interval_ms: int, dead_after_ms: int
    ) -> None:
        self.storage, self.role, self.instance = storage, role, instance
        self.interval_ms, self.dead_after_ms = interval_ms, dead_after_ms
        self.started = asyncio.Event()  # the first beat went through
        self._failed = True  # as if after an outage: the first beat starts the wait
        self._judge_from = 0.0  # time.monotonic()

    def may_judge_others(self) -> bool:
        return self.started.is_set() and not self._failed and time.monotonic() >= self._judge_from

    async def step(self) -> None:
        """One beat, then wait `interval_ms` (a loop step for resilience.forever)."""
        try:
            await self.storage.beat(self.role, self.instance, self.dead_after_ms)
        except StorageUnavailable:
            self._failed = True
            raise
        if self._failed:
            self._failed = False
            self._judge_from = time.monotonic() + self.dead_after_ms / 1000
        self.started.set()
        await asyncio.sleep(self.interval_ms / 1000)

    async def stop(self) -> None:
        """Drop the key: the instance is gone now, not after its lapse."""
        await self.storage.forget(self.role, self.instance)
