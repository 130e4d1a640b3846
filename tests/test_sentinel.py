"""Redis Sentinel: a failover in the middle of a run loses no job, and the service carries on
against the new master (a real master, replica and three sentinels on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from downloader.embedded import find_redis_server
from downloader.storage import Keys
from tests.conftest import Service
from tests.servers import CallbackReceiver, FileServer, free_port

MASTER_NAME = "mymaster"
FINAL_DOWNLOAD_EVENTS = {"download.succeeded", "download.failed", "job.aborted"}
PHASE_JOBS = 20  # before the failover, during it, after it: 60 in all
AGGREGATIONS = 4


class Node:
    """One redis-server (or sentinel) process on 127.0.0.1, its files in its own directory."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.port = free_port()
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

    def client(self) -> aioredis.Redis:
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
        self.clients: list[aioredis.Redis] = []

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
                return int((await r.info("replication"))["master_repl_offset"]) >= target

        await self._until(caught_up, timeout_s, "the replica never caught up")

    async def wait_demoted(self, node: Node, timeout_s: float = 60.0) -> None:
        """`node` (a master that stayed up) has been turned into a replica and synced from the new
        master: whatever was written to it alone is gone now."""

        async def demoted() -> bool:
            async with node.client() as r:
                info = await r.info("replication")
            return info["role"] == "slave" and info.get("master_link_status") == "up"

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


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """The group; requested before `service_factory`, so it is torn down after the service."""
    group = SentinelGroup(tmp_path / "ha")
    try:
        await group.start()
        yield group
    finally:
        for client in group.clients:
            await client.aclose()
        group.stop()


@dataclass
class Submitter:
    """POSTs jobs like a careful client: one Idempotency-Key per job, 503s retried after
    Retry-After, so a POST whose answer was lost in the failover never makes a second job."""

    svc: Service
    receiver: CallbackReceiver
    url: str
    ids: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    unavailable: int = 0  # 503 answers
    replayed: int = 0  # retries answered "Idempotent-Replayed"

    async def submit(self, n: int, tag: str, pause_s: float = 0.0) -> list[str]:
        out = []
        for i in range(n):
            out.append(await self.post(f"{tag}-{i}", f"aggr{i % AGGREGATIONS}"))
            if pause_s:
                await asyncio.sleep(pause_s)  # spread these POSTs over the failover
        return out

    async def post(self, key: str, aggr: str) -> str:
        assert self.svc.http is not None
        body = {
            "aggr_id": aggr,
            "aggr_limit": 2,
            "url": self.url,
            "callback_url": self.receiver.url("/cb"),
            "extra": key,
        }
        for _ in range(100):  # ~100 s of 503s at most: far beyond any failover here
            async with self.svc.http.post(
                self.svc.base_url + "/download", json=body, headers={"Idempotency-Key": key}
            ) as resp:
                data = await resp.json(content_type=None)
                if resp.status == 201:
                    self.replayed += resp.headers.get("Idempotent-Replayed") == "true"
                    self.ids[key] = data["id"]
                    return str(data["id"])
                assert resp.status == 503, (resp.status, data)
                self.unavailable += 1
                await asyncio.sleep(float(resp.headers["Retry-After"]))
        raise AssertionError(f"job {key} was never accepted")


async def check_every_job(
    svc: Service, receiver: CallbackReceiver, client: Submitter, master: aioredis.Redis
) -> Counter[str]:
    """Every accepted job is on the current master and ends with exactly one final download
    outcome and a delivered callback; returns how many callbacks each job got."""
    keys = Keys("dl")
    lost = [k for k, job_id in client.ids.items() if not await master.exists(keys.job(job_id))]
    assert not lost, f"{len(lost)} of {len(client.ids)} accepted jobs are not on the master: {lost}"
    for job_id in client.ids.values():
        await receiver.wait_for(job_id, timeout=30)
        job = await svc.wait_job(job_id, lambda j: j["callback_state"] == "Success", timeout=30)
        assert job["download_state"] == "Success", job
        status, body = await svc.get(f"/jobs/{job_id}/events")
        assert status == 200
        finals = [e["type"] for e in body["events"] if e["type"] in FINAL_DOWNLOAD_EVENTS]
        assert finals == ["download.succeeded"], (job_id, finals)
        stored = await master.hmget(keys.job(job_id), ["download_state", "callback_state"])
        assert stored == ["Success", "Success"], (job_id, stored)
    return Counter(p["job_id"] for p in receiver.received)


async def run_failover(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
    failover: Callable[[], Awaitable[None]],
) -> Submitter:
    """Submit jobs before, during and after `failover`; check nothing was lost."""
    svc = await service_factory(
        {"redis": {"sentinel": True, "addr": sentinels.addr, "master_name": MASTER_NAME}}
    )
    sentinels.clients += svc.storage.r.connection_pool.sentinel_manager.sentinels
    client = Submitter(svc, receiver, files.add("/f", b"payload " * 64))
    before = await client.submit(PHASE_JOBS, "before")
    await failover()
    during = await client.submit(PHASE_JOBS, "during", pause_s=0.05)
    await sentinels.wait_master(sentinels.replica)
    after = await client.submit(PHASE_JOBS, "after")
    if sentinels.master.proc is not None and sentinels.master.proc.poll() is None:
        await sentinels.wait_demoted(sentinels.master)
    ids = before + during + after
    assert len(set(ids)) == 3 * PHASE_JOBS
    async with sentinels.replica.client() as master:
        callbacks = await check_every_job(svc, receiver, client, master)
        assert set(ids) <= set(callbacks)
        jobs = [k async for k in master.scan_iter(match="dl:job:{*}", count=1000)]
        assert len([k for k in jobs if k.endswith("}")]) == len(ids)  # no duplicate job
    print(
        f"\n  sentinel failover: {len(ids)} jobs, {client.unavailable} POSTs answered 503, "
        f"{client.replayed} replayed, {sum(callbacks.values()) - len(ids)} duplicate callbacks"
    )
    return client


@pytest.mark.timeout(120)
async def test_master_sigkilled_mid_run_fails_over_without_losing_a_job(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """SIGKILL of the master mid-run (its writes replicated): POSTs get 503 until the sentinels
    promote the replica, then every job (before, during, after) ends once with a callback."""

    async def kill_master() -> None:
        await sentinels.wait_replicated()  # what the master acknowledged is on the replica
        sentinels.master.kill()

    client = await run_failover(sentinels, service_factory, files, receiver, kill_master)
    assert client.unavailable > 0  # the outage was real, and answered the documented way


@pytest.mark.timeout(120)
async def test_sentinel_failover_command_mid_run_loses_no_job(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """SENTINEL FAILOVER mid-run (the old master stays up and is demoted): no job is lost."""

    async def failover_command() -> None:
        async with sentinels.sentinels[0].client() as s:
            assert await s.execute_command("SENTINEL FAILOVER", MASTER_NAME)

    await run_failover(sentinels, service_factory, files, receiver, failover_command)


@pytest.mark.timeout(120)
async def test_job_accepted_while_the_replica_lags_survives_the_master_dying(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """A POST answered while the replica has not got the job (its link cut, the replica
    frozen) is either refused (503, retried later) or survives the master's SIGKILL."""
    svc = await service_factory(
        {"redis": {"sentinel": True, "addr": sentinels.addr, "master_name": MASTER_NAME}}
    )
    sentinels.clients += svc.storage.r.connection_pool.sentinel_manager.sentinels
    client = Submitter(svc, receiver, files.add("/f", b"payload " * 64))
    await client.submit(5, "before")
    await sentinels.wait_replicated()
    sentinels.replica.freeze()  # it cannot reconnect and resync before the master dies
    try:
        async with sentinels.master.client() as m:
            assert await m.client_kill_filter(_type="replica") == 1
        assert svc.http is not None
        body = {"aggr_id": "lag", "aggr_limit": 1, "url": files.url("/f"),
                "callback_url": receiver.url("/cb")}  # fmt: skip
        async with svc.http.post(
            svc.base_url + "/download", json=body, headers={"Idempotency-Key": "lagging-0"}
        ) as resp:
            assert resp.status in (201, 503), resp.status
            if resp.status == 201:
                client.ids["lagging-0"] = (await resp.json())["id"]
        sentinels.master.kill()
    finally:
        sentinels.replica.thaw()
    await sentinels.wait_master(sentinels.replica)
    if "lagging-0" not in client.ids:
        await client.post("lagging-0", "lag")  # the refused POST, retried as the contract says
    async with sentinels.replica.client() as master:
        await check_every_job(svc, receiver, client, master)
