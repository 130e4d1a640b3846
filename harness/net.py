"""Loopback helpers: a free port, waiting for a server to answer."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp

__all__ = ["free_port", "wait_http"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout: float = 15.0) -> None:
    """Wait until something answers at `url` (a spawned API coming up)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.05)
