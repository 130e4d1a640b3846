"""Fixtures: a private redis-server per session, real HTTP peers on loopback, and the service
itself, run in-process (`service`) or as real OS processes (`spawn`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from downloader.api import build_app
from downloader.cli import make_notifier
from downloader.config import Config, load_config
from downloader.embedded import EmbeddedRedis
from downloader.heartbeat import new_instance_id
from downloader.ids import shard_of
from downloader.notifier import Notifier
from downloader.processor import Processor
from downloader.storage import Storage, connect
from harness.moto_server import MotoServer, make_bucket
from harness.redis_cluster import ClusterGroup
from harness.redis_nodes import SentinelGroup, StrRedis
from harness.servers import (
    CallbackReceiver,
    FileServer,
    ForwardProxy,
    HoldingReceiver,
    TcpRelay,
    free_port,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server on a free port (the same binary `make run` embeds)."""
    data = Path(tempfile.mkdtemp(prefix="dl-redis-"))
    server = EmbeddedRedis(data, "127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[StrRedis]:
    """A client on a flushed database: every test starts from nothing."""
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


def fast_settings(redis_addr: str, tmp: Path) -> dict[str, Any]:
    """Config for tests: millisecond timers, loopback allowed, files under tmp."""
    return {
        "redis": {"addr": redis_addr},
        "api": {"heartbeat_path": str(tmp / "hb-off"), "port": 0},
        "processor": {
            "storage_dir": str(tmp / "files"),
            "download_url": "http://files.test/dl",
            "request_headers": {"User-Agent": "downloader-test", "X-Default": "d"},
            "retry_backoff_seconds": 0.01,
            "stats_interval": 100,
            "lease_ms": 1000,
            "rescan_interval_ms": 500,
            "disk_check_interval_ms": 100,
            "shutdown_grace_seconds": 2,
        },
        "notifier": {
            "concurrency": 20,
            "stats_interval": 100,
            "deletion_interval": 0.005,
            "retry_schedule_seconds": [0.01, 0.02],
            "shutdown_grace_seconds": 2,
        },
        "backends": {"http": {"timeout": 2}},
        "security": {"allow_private_networks": True},
        "log": {"level": "warning"},
    }


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_config(
    redis_server: EmbeddedRedis, redis_client: StrRedis, tmp_path: Path
) -> Callable[..., tuple[Path, Config]]:
    """`make_config({"processor": {...}})` -> (path of a config.json, the validated Config)."""

    def make(patch: dict[str, Any] | None = None, name: str = "config.json") -> tuple[Path, Config]:
        raw = merge(fast_settings(redis_server.addr, tmp_path), patch or {})
        path = tmp_path / name
        path.write_text(json.dumps(raw))
        return path, load_config(path, environ={})

    return make


class Service:
    """api + processor + notifier running in this event loop, against the test Redis."""

    def __init__(self, config: Config, roles: set[str]) -> None:
        self.config = config
        self.roles = roles
        self.stop = asyncio.Event()
        self.storage = Storage(connect(config), config)
        self.tasks: list[asyncio.Task[None]] = []
        self.processor: Processor | None = None
        self.notifier: Notifier | None = None
        self.http: aiohttp.ClientSession | None = None
        self.base_url = ""

    async def start(self) -> Service:
        from aiohttp import web

        if "api" in self.roles:
            self.runner = web.AppRunner(build_app(self.config, self.storage), access_log=None)
            await self.runner.setup()
            port = free_port()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()
            self.base_url = f"http://127.0.0.1:{port}"
        if "processor" in self.roles:
            self.processor = Processor(self.config, self.storage, new_instance_id())
            self.tasks.append(asyncio.create_task(self.processor.run(self.stop)))
        if "notifier" in self.roles:
            self.notifier = make_notifier(self.config, self.storage, new_instance_id())
            self.tasks.append(asyncio.create_task(self.notifier.run(self.stop)))
        self.http = aiohttp.ClientSession()
        return self

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.post(self.base_url + path, json=body, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.get(self.base_url + path, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def http_delete(self, path: str) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.delete(self.base_url + path) as r:
            return r.status, await r.json(content_type=None)

    async def submit(self, **body: Any) -> str:
        status, data = await self.post("/download", body)
        assert status == 201, data
        return str(data["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        status, data = await self.get(f"/jobs/{job_id}")
        assert status == 200, data
        return dict(data)

    async def wait_job(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait until the job's projection satisfies `predicate` (watching its shard's event
        stream for anything new)."""
        deadline = time.monotonic() + timeout
        stream = self.storage.keys.events(shard_of(job_id))
        after = "0-0"
        while True:
            job = await self.job(job_id)
            if predicate(job):
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} never got there: {job}")
            after = max(after, job["last_event_id"] or "0-0", key=stream_order)
            # at most 5 s a read, like the service's own: the client's socket_timeout is 15 s
            block_ms = max(1, min(5000, int(remaining * 1000)))
            res = await self.storage.r.xread({stream: after}, count=1000, block=block_ms)
            for _s, entries in res or []:
                after = entries[-1][0]

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """GET /jobs/{id}/events: the job's events as the API tells them."""
        status, body = await self.get(f"/jobs/{job_id}/events")
        assert status == 200, body
        return list(body["events"])

    async def all_events(self) -> list[tuple[str, dict[str, str]]]:
        """Every shard's events as (id, {job_id, type, data}), merged in id (time) order."""
        keys = self.storage.keys
        merged = []
        for s in range(keys.shards):
            for entry_id, f in await self.storage.r.xrange(keys.events(s)):
                merged.append((entry_id, {"job_id": f["j"], "type": f["t"], "data": f["d"]}))
        return sorted(merged, key=lambda e: stream_order(e[0]))

    async def wakes(self) -> int:
        """Wake entries on every shard's wake stream."""
        keys = self.storage.keys
        return sum([await self.storage.r.xlen(keys.wake(s)) for s in range(keys.shards)])

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        if "api" in self.roles:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()
        await self.storage.close()


@dataclass
class Submitter:
    """POSTs jobs like a careful client: one Idempotency-Key per job, 503s retried after
    Retry-After, so a POST whose answer was lost in the failover never makes a second job."""

    svc: Service
    receiver: CallbackReceiver
    url: str
    aggregations: int = 4
    ids: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    unavailable: int = 0  # 503 answers
    replayed: int = 0  # retries answered "Idempotent-Replayed"
    _accepted: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def accepted(self, n: int, timeout_s: float = 60.0) -> None:
        """Until this client has had `n` POSTs accepted (201), counting every submit."""
        async with asyncio.timeout(timeout_s), self._accepted:
            await self._accepted.wait_for(lambda: len(self.ids) >= n)

    async def submit(self, n: int, tag: str, pause_s: float = 0.0) -> list[str]:
        out = []
        for i in range(n):
            out.append(await self.post(f"{tag}-{i}", f"aggr{i % self.aggregations}"))
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
                    async with self._accepted:
                        self._accepted.notify_all()
                    return str(data["id"])
                assert resp.status == 503, (resp.status, data)
                self.unavailable += 1
                await asyncio.sleep(float(resp.headers["Retry-After"]))
        raise AssertionError(f"job {key} was never accepted")


@pytest.fixture
async def store(make_config: Callable[..., tuple[Path, Config]]) -> AsyncIterator[Storage]:
    """A Storage on the test's Redis (as the service's own processes make it), to read jobs
    the way the service does (a settled job is packed: no raw key to look at)."""
    _path, config = make_config()
    storage = Storage(connect(config), config)
    yield storage
    await storage.close()


@pytest.fixture
async def service_factory(
    make_config: Callable[..., tuple[Path, Config]],
) -> AsyncIterator[Callable[..., Any]]:
    """`await service_factory(patch, roles)` -> a started in-process Service."""
    started: list[Service] = []

    async def make(patch: dict[str, Any] | None = None, roles: set[str] | None = None) -> Service:
        _path, config = make_config(patch)
        svc = await Service(config, roles or {"api", "processor", "notifier"}).start()
        started.append(svc)
        return svc

    yield make
    for svc in reversed(started):
        await svc.close()


@pytest.fixture
async def service(service_factory: Callable[..., Any]) -> Service:
    """The whole service with the test defaults."""
    return await service_factory()  # type: ignore[no-any-return]


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    server = await FileServer().start()
    yield server
    await server.close()


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    server = await CallbackReceiver().start()
    yield server
    await server.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    server = await ForwardProxy().start()
    yield server
    await server.close()


class Proc:
    """One `downloader <role>` OS process."""

    def __init__(self, role: str, config_path: Path, port: int | None, log_path: Path) -> None:
        self.role, self.config_path, self.port, self.log_path = role, config_path, port, log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        args = [sys.executable, "-m", "downloader", self.role, "-c", str(self.config_path)]
        if self.port is not None:
            args += ["--port", str(self.port), "--host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def start_api(spawn: Callable[..., Proc], config_path: Path) -> str:
    """A spawned `downloader api` on a free port, once it answers; returns its base URL."""
    port = free_port()
    spawn("api", config_path, port)
    api = f"http://127.0.0.1:{port}"
    await wait_http(f"{api}/hb")
    return api


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """`spawn(role, config_path, port=None)` starts a real process; all are killed at the end."""
    procs: list[Proc] = []

    def make(role: str, config_path: Path, port: int | None = None) -> Proc:
        p = Proc(role, config_path, port, tmp_path / f"{role}-{len(procs)}.log").start()
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.popen is not None and p.popen.poll() is None:
            p.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(10)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


def stream_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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


@pytest.fixture
async def redis_cluster(tmp_path: Path) -> AsyncIterator[ClusterGroup]:
    """A Redis Cluster of three masters and three replicas formed for the test; request it
    before `service_factory`, so it is torn down after the service."""
    cluster = ClusterGroup(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server (S3) per test module; each test makes its own bucket in it."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
async def bucket(moto: MotoServer) -> str:
    """A new bucket of its own in the module's moto server."""
    return await make_bucket(moto)


@pytest.fixture
async def moto_relay(moto: MotoServer) -> AsyncIterator[TcpRelay]:
    """A TcpRelay in front of the module's moto server, to point the service at (endpoint
    `http://127.0.0.1:<relay.port>`) and then stall or cut; released and stopped at the end."""
    relay = await TcpRelay(moto.port).start()
    yield relay
    relay.release()
    await relay.stop()


@pytest.fixture
async def holding() -> AsyncIterator[HoldingReceiver]:
    """A callback receiver that holds each job's first callback until `holding.release` is set
    (a notifier mid-delivery, for as long as a test needs), closed at teardown."""
    server = await HoldingReceiver().start()
    yield server
    await server.close()
