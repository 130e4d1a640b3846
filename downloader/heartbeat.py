"""Each running process publishes its stats under its instance id; the API sums them."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable, Mapping

from downloader.storage import Storage

__all__ = ["new_instance_id", "publish_stats"]


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
