"""Redis servers of our own on loopback for tests and benchmarks: a node (a redis-server or a
sentinel process with its files in its own directory), and a Sentinel group (a master, a
replica and three sentinels)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from downloader.embedded import find_redis_server
from harness.net import free_port

__all__ = ["MASTER_NAME", "Node", "SentinelGroup", "StrRedis", "data_keys"]

StrRedis: TypeAlias = Any
"""A `redis.asyncio.Redis` with `decode_responses=True`. redis-py types every reply as `bytes |
str | ...` whatever the client decodes; like downloader.storage, tests and benchmarks type such
a client as Any rather than cast every reply."""

MASTER_NAME = "mymaster"


async def data_keys(r: StrRedis) -> list[str]:
    """Every key but the instances' heartbeats (each API instance announces itself), sorted."""
    keys = await r.keys("*")
    return sorted(k for k in keys if "{meta}" not in k)


class Node:
    """One redis-server (or sentinel) process on 127.0.0.1, its files in its own directory."""

    def __init__(self, name: str, workdir: Path, port: int | None = None) -> None:
        self.name = name
        self.port = free_port() if port is None else port
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Node:
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen(
                [find_redis_server(), *extra, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def client(self) -> StrRedis:
        return aioredis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.dir / "log").read_text(errors="replace")[-3000:]


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2), AOF with fsync on every write."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = self._server("master")
        self.replica = self._server("replica")
        self.sentinels = [self._sentinel(f"sentinel{i}") for i in range(3)]
        # The services' redis-py clients of the sentinels, as created. Storage.close() leaves
        # them open, and redis-py's Sentinel.discover_master, run concurrently, can drop one
        # from its list (never to be closed); unclosed, they warn (an error here) when collected.
        self.clients: list[StrRedis] = []

    def _server(self, name: str) -> Node:
        node = Node(name, self.workdir)
        node.args = [
            "--bind", "127.0.0.1", "--port", str(node.port), "--dir", str(node.dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip
        return node

    def _sentinel(self, name: str) -> Node:
        node = Node(name, self.workdir)
        node.args = [str(node.dir / "sentinel.conf"), "--sentinel"]
        return node

    @property
    def addr(self) -> str:
        """The `redis.addr` of the service: every sentinel."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def nodes(self) -> list[Node]:
        return [self.master, self.replica, *self.sentinels]

    async def start(self, timeout_s: float = 30.0) -> None:
        self.master.start()
        self.replica.start("--replicaof", "127.0.0.1", str(self.master.port))
        for s in self.sentinels:
            (s.dir / "sentinel.conf").write_text(
                f"port {s.port}\nbind 127.0.0.1\nprotected-mode no\ndir {s.dir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
            )
            s.start()
        await self._until(self._ready, timeout_s, "the replica and sentinels did not come up")

    async def _ready(self) -> bool:
        """The replica streams from the master, and every sentinel knows both others and it."""
        async with self.replica.client() as r:
            if (await r.info("replication")).get("master_link_status") != "up":
                return False
        for s in self.sentinels:
            async with s.client() as c:
                m = await c.sentinel_master(MASTER_NAME)
            if m["num-other-sentinels"] < 2 or m["num-slaves"] < 1:
                return False
        return True

    async def wait_master(self, node: Node, timeout_s: float = 30.0) -> None:
        """Every sentinel names `node` as the master, and `node` says it is one."""

        async def switched() -> bool:
            for s in self.sentinels:
                async with s.client() as c:
                    addr = await c.sentinel_get_master_addr_by_name(MASTER_NAME)
                if addr is None or int(addr[1]) != node.port:
                    return False
            async with node.client() as r:
                return str((await r.execute_command("ROLE"))[0]) == "master"

        await self._until(switched, timeout_s, f"the sentinels never switched to {node.name}")

    async def wait_replicated(self, timeout_s: float = 10.0) -> None:
        """The replica has applied everything the master has written so far."""
        async with self.master.client() as m:
            target = (await m.info("replication"))["master_repl_offset"]

        async def caught_up() -> bool:
            async with self.replica.client() as r:
                offset = int((await r.info("replication"))["master_repl_offset"])
            return offset >= int(target)

        await self._until(caught_up, timeout_s, "the replica never caught up")

    async def wait_demoted(self, node: Node, timeout_s: float = 60.0) -> None:
        """`node` (a master that stayed up) has been turned into a replica and synced from the new
        master: whatever was written to it alone is gone now."""

        async def demoted() -> bool:
            async with node.client() as r:
                info = await r.info("replication")
            return bool(info["role"] == "slave" and info.get("master_link_status") == "up")

        await self._until(demoted, timeout_s, f"{node.name} was never demoted")

    async def _until(
        self, check: Callable[[], Awaitable[bool]], timeout_s: float, what: str
    ) -> None:
        """Poll other OS processes (bounded): they have no event we could await."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RedisError, OSError):
                if await check():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log()}" for n in self.nodes)
                raise TimeoutError(f"{what}\n{logs}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
