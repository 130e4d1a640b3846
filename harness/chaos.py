"""Chaos: jobs keep flowing while a driver SIGKILLs random service processes and restarts them.

N jobs over A aggregations go through 2 `api`, 3 `processor` and 2 `notifier` OS processes
(`python -m downloader <role> -c cfg`, one private Redis). The origin answers 200 for most jobs,
500 once for some (a retry fixes them) and 500 always for a few (they fail after their retries),
each after a small random delay. The submitter paces the POSTs over the run and retries any that
fails (connection refused while its API is down, a reset, a 503) with the same Idempotency-Key,
switching to the other API. Meanwhile the killer SIGKILLs a random process at random moments and
restarts it, at least `min_kills` times and until every job was accepted. Then it stops, every
process runs again, and the driver waits for the drain: a callback for every job.

Checked for every job: GET /jobs/{id} says download_state Success (Failed for the always-500
ones) and callback_state Success; its events hold exactly one of download.succeeded /
download.failed / job.aborted; the receiver saw its callback. Redis holds exactly N jobs (a
retried POST never made a second one). Reported: kills survived, jobs lost (must be 0), duplicate
callbacks (delivery is at least once: a notifier killed between delivering and recording it
leaves the callback to another), time to drain.

    .venv/bin/python bench/chaos.py [--jobs 1000] [--aggregations 20] [--min-kills 20] [--seed 1]

(bench/chaos.py is the command line of this module.)

prints the figures and writes them to bench/results/chaos.json. tests/test_chaos.py runs the
same scenario, smaller (300 jobs, 10 kills).

    .venv/bin/python bench/chaos.py --notifier-recovery [--callbacks 10]

measures one thing instead: how long the callbacks of a SIGKILLed notifier wait. One api, one
processor and one notifier run with the default notifier timers; the receiver holds the first
callback of each of N jobs (the notifier is mid-delivery), the notifier is SIGKILLed and a new
one started at once; reported: the time from the kill until every held callback was delivered
again (and until the first). Written to bench/results/notifier_recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from downloader.config import Config
from downloader.embedded import EmbeddedRedis
from downloader.storage import Storage, connect
from harness.servers import HoldingReceiver, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "chaos.json"
RECOVERY_RESULTS = ROOT / "bench" / "results" / "notifier_recovery.json"

FINAL_DOWNLOAD_EVENTS = ("download.succeeded", "download.failed", "job.aborted")
ROLES = {"api": 2, "processor": 3, "notifier": 2}


@dataclass(frozen=True)
class ChaosSpec:
    """The scenario's knobs."""

    jobs: int = 1000
    aggregations: int = 20
    aggr_limit: int = 3
    min_kills: int = 20
    submit_s: float = 20.0  # the POSTs are spread over about this long
    kill_gap_s: tuple[float, float] = (0.3, 1.2)  # between a restart and the next kill
    down_s: tuple[float, float] = (0.0, 0.4)  # how long a killed process stays down
    origin_delay_s: float = 0.1  # each origin answer waits up to this long
    callback_delay_s: float = 0.05  # and each callback answer up to this long
    drain_timeout_s: float = 60.0
    seed: int = 1


@dataclass
class ChaosResult:
    """What the run measured; `lost` must be 0 and `problems` empty."""

    jobs: int
    kills: int
    kills_by_role: dict[str, int]
    jobs_in_redis: int
    lost: int
    lost_examples: list[str]
    problems: list[str]
    duplicate_callbacks: int
    jobs_with_duplicates: int
    post_retries: int
    replayed_posts: int
    requeued_downloads: int  # download.requeued events: a processor died holding the job
    extra_callback_attempts: int  # callback.attempted beyond one per job: reclaims and retries
    succeeded: int
    failed: int
    submit_s: float
    drain_s: float | None  # from the last kill to the last callback; None: never drained
    wall_s: float
    seed: int


def kind_of(i: int) -> str:
    """Job i's origin behaviour: 10% always 500, 20% 500 once, the rest 200."""
    return "bad" if i % 10 == 0 else "flaky" if i % 10 in (1, 2) else "ok"


class Peers:
    """The origin and the callback receiver, on one aiohttp server in the driver's loop."""

    def __init__(self, delay_s: float, callback_delay_s: float, seed: int) -> None:
        self.delay_s, self.callback_delay_s = delay_s, callback_delay_s
        self.rng = random.Random(seed)
        self.hits: Counter[str] = Counter()
        self.callbacks: Counter[str] = Counter()
        self.payloads: dict[str, dict[str, Any]] = {}
        self.last_callback_at = 0.0
        self._arrived = asyncio.Condition()
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> Peers:
        app = web.Application()
        app.router.add_get("/origin/{kind}/{name}", self._origin)
        app.router.add_post("/cb", self._callback)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _origin(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] += 1
        await asyncio.sleep(self.rng.uniform(0, self.delay_s))
        kind = request.match_info["kind"]
        if kind == "bad" or (kind == "flaky" and self.hits[path] == 1):
            return web.Response(status=500, text="scripted failure")
        return web.Response(body=f"body of {path}\n".encode() * 64)

    async def _callback(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        await asyncio.sleep(self.rng.uniform(0, self.callback_delay_s))
        async with self._arrived:
            self.callbacks[payload["job_id"]] += 1
            self.payloads[payload["job_id"]] = payload
            self.last_callback_at = time.monotonic()
            self._arrived.notify_all()
        return web.Response(text="ok")

    async def wait_callbacks(self, ids: set[str], timeout_s: float) -> None:
        """Until every job in `ids` called back (TimeoutError after timeout_s)."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: ids <= self.callbacks.keys())


START_LINES = {
    "api": b"api listening",
    "processor": b"processor started",
    "notifier": b"notifier started",
}
"""What each role logs once it is up (cli.py, processor.py, notifier.py)."""


class Proc:
    """One `downloader <role>` OS process that can be SIGKILLed and started again."""

    def __init__(self, role: str, index: int, config: Path, workdir: Path) -> None:
        self.role, self.index, self.config = role, index, config
        self.port = free_port() if role == "api" else None
        self.log_path = workdir / f"{role}-{index}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_offset = 0

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def start(self) -> None:
        args = [sys.executable, "-m", "downloader", self.role, "-c", str(self.config)]
        if self.port is not None:
            args += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with contextlib.suppress(FileNotFoundError):
            self.log_offset = self.log_path.stat().st_size  # this run's lines start here
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def started(self) -> bool:
        """This run has logged its role's start line (its signal handlers are installed: a
        SIGTERM before that kills a process still importing, which is not a graceful stop)."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return START_LINES[self.role] in f.read()
        return False

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, and its exit code (None if it had to be killed, or never ran)."""
        if self.popen is None:
            return None
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            return None

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""


def chaos_config(redis_addr: str, workdir: Path, cluster: bool = False) -> dict[str, Any]:
    """Short leases and liveness lapses so a killed process's work comes back within 1-2 s;
    `cluster`: `redis_addr` names a Redis Cluster's seed nodes."""
    return {
        "redis": {"addr": redis_addr, "cluster": cluster},
        "api": {"heartbeat_path": str(workdir / "hb-off")},
        "processor": {
            "storage_dir": str(workdir / "files"),
            "download_url": "http://files.test/dl",
            "retry_backoff_seconds": 0.05,
            "stats_interval": 200,
            "lease_ms": 1000,
            "rescan_interval_ms": 500,
            "shutdown_grace_seconds": 2,
        },
        "notifier": {
            "concurrency": 20,
            "stats_interval": 200,
            "deletion_interval": 0.005,
            "retry_schedule_seconds": [0.05, 0.1, 0.2, 0.5, 1],
            "heartbeat_ms": 250,
            "dead_after_ms": 1500,
            "shutdown_grace_seconds": 2,
        },
        "backends": {"http": {"timeout": 2}},
        "security": {"allow_private_networks": True},
        "log": {"level": "warning"},
    }


class Chaos:
    """One run of the scenario against the Redis at `redis_addr` (which it does not own)."""

    def __init__(
        self, spec: ChaosSpec, redis_addr: str, workdir: Path, cluster: bool = False
    ) -> None:
        self.spec = spec
        self.redis_addr = redis_addr
        self.cluster = cluster
        self.workdir = workdir
        self.rng = random.Random(spec.seed)
        self.config = workdir / "chaos-config.json"
        self.procs = [
            Proc(role, i, self.config, workdir) for role, n in ROLES.items() for i in range(n)
        ]
        self.apis = [p for p in self.procs if p.role == "api"]
        self.kills: Counter[str] = Counter()
        self.last_kill_at = 0.0
        self.ids: dict[int, str] = {}
        self.post_retries = 0
        self.replayed = 0
        self.unexpected: list[str] = []  # problems seen along the way
        self.peers = Peers(spec.origin_delay_s, spec.callback_delay_s, spec.seed)

    async def run(self) -> ChaosResult:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(chaos_config(self.redis_addr, self.workdir, self.cluster))
        )
        await self.peers.start()
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for p in self.procs:
                    p.start()
                await self._wait_ready(http)
                submitted = asyncio.Event()
                killer = asyncio.create_task(self._killer(submitted))
                t0 = time.monotonic()
                try:
                    await self._submit_all(http)
                finally:
                    submit_s = time.monotonic() - t0
                    submitted.set()
                    await killer
                ids = set(self.ids.values())
                drain_s: float | None = None  # not drained within drain_timeout_s
                with contextlib.suppress(TimeoutError):
                    await self.peers.wait_callbacks(ids, self.spec.drain_timeout_s)
                    drain_s = max(0.0, self.peers.last_callback_at - self.last_kill_at)
                result = await self._verify(http, submit_s, drain_s, time.monotonic() - started)
            await self._wait_started()
            for p in self.procs:  # SIGTERM: a graceful stop exits 0 (README, Processes)
                if (code := p.stop()) != 0:
                    result.problems.append(f"{p.name} exited {code} on SIGTERM:\n{p.log_tail()}")
            return result
        finally:
            for p in self.procs:
                p.stop()
            await self.peers.close()

    # -- the three actors ------------------------------------------------------------------

    async def _submit_all(self, http: aiohttp.ClientSession) -> None:
        """POST every job, paced over spec.submit_s, a few at a time."""
        pace_s = self.spec.submit_s / self.spec.jobs
        slots = asyncio.Semaphore(8)
        tasks = []
        for i in range(self.spec.jobs):
            await slots.acquire()
            task = asyncio.create_task(self._submit(http, i))
            task.add_done_callback(lambda _t: slots.release())
            tasks.append(task)
            await asyncio.sleep(pace_s)  # the load's shape, not a wait for an event
        await asyncio.gather(*tasks)

    async def _submit(self, http: aiohttp.ClientSession, i: int) -> None:
        kind = kind_of(i)
        body = {
            "aggr_id": f"aggr{i % self.spec.aggregations}",
            "aggr_limit": self.spec.aggr_limit,
            "url": self.peers.url(f"/origin/{kind}/job{i}"),
            "callback_url": self.peers.url("/cb"),
            "extra": str(i),
        }
        headers = {"Idempotency-Key": f"chaos-{self.spec.seed}-{i}"}
        for attempt in range(600):  # bounded: far beyond any outage the killer causes
            api = self.apis[(i + attempt) % len(self.apis)]
            try:
                async with http.post(
                    f"http://127.0.0.1:{api.port}/download", json=body, headers=headers
                ) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status == 201:
                        self.ids[i] = str(data["id"])
                        self.replayed += resp.headers.get("Idempotent-Replayed") == "true"
                        return
                    if resp.status != 503:
                        self.unexpected.append(f"job {i}: POST answered {resp.status} {data}")
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # that API is down or was killed mid-request: retry, on the other one
            self.post_retries += 1
            await asyncio.sleep(0.05 if attempt < 3 else 0.2)
        self.unexpected.append(f"job {i}: never accepted")

    async def _killer(self, submitted: asyncio.Event) -> None:
        """SIGKILL a random process, restart it after a random pause, until enough kills and
        every job was accepted; then make sure everything runs."""
        lo, hi = self.spec.kill_gap_s
        while not (submitted.is_set() and sum(self.kills.values()) >= self.spec.min_kills):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(submitted.wait(), self.rng.uniform(lo, hi))
            if submitted.is_set() and sum(self.kills.values()) >= self.spec.min_kills:
                break
            self._restart_crashed()
            victim = self.rng.choice(self.procs)
            victim.kill()
            self.kills[victim.role] += 1
            self.last_kill_at = time.monotonic()
            await asyncio.sleep(self.rng.uniform(*self.spec.down_s))
            victim.start()
        self._restart_crashed()

    def _restart_crashed(self) -> None:
        """A process that died without our SIGKILL crashed: note it, and start it again."""
        for p in self.procs:
            if not p.alive():
                self.unexpected.append(f"{p.name} died on its own:\n{p.log_tail()}")
                p.start()

    # -- readiness and verification -----------------------------------------------------------

    async def _wait_started(self, timeout_s: float = 30.0) -> None:
        """Every running process, restarted by the killer a moment ago too, got past its start
        (other OS processes: a bounded poll of their logs)."""
        deadline = time.monotonic() + timeout_s
        while any(p.alive() and not p.started() for p in self.procs):
            if time.monotonic() > deadline:
                return  # the SIGTERM check below names the process
            await asyncio.sleep(0.05)

    async def _wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        """Both APIs answer /hb and every processor and notifier published its stats (other OS
        processes: a bounded poll)."""
        want = Counter({r: n for r, n in ROLES.items() if r != "api"})
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [p for p in self.procs if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                ok = True
                for api in self.apis:
                    async with http.get(f"http://127.0.0.1:{api.port}/hb") as r:
                        ok = ok and r.status == 200
                if ok:
                    async with http.get(
                        f"http://127.0.0.1:{self.apis[0].port}/dashboard/instances"
                    ) as r:
                        live = Counter(m.split(":", 1)[0] for m in await r.json())
                    if all(live[r] >= n for r, n in want.items()):
                        return
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not come up")
            await asyncio.sleep(0.1)

    async def _get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        for attempt in range(50):  # bounded; every process runs again by now
            api = self.apis[attempt % len(self.apis)]
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"http://127.0.0.1:{api.port}{path}") as r:
                    if r.status != 503:
                        return r.status, await r.json(content_type=None)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no API answered GET {path}")

    async def _settled(self, http: aiohttp.ClientSession, job_id: str) -> dict[str, Any]:
        """The job once its callback is recorded (the receiver may see it a moment earlier)."""
        for _ in range(100):  # bounded: ~10 s
            status, job = await self._get(http, f"/jobs/{job_id}")
            if status != 200 or job["callback_state"] in ("Success", "Failed"):
                return {"_status": status, **(job if status == 200 else {})}
            await asyncio.sleep(0.1)
        return {"_status": 200, **job}

    async def _verify(
        self, http: aiohttp.ClientSession, submit_s: float, drain_s: float | None, wall_s: float
    ) -> ChaosResult:
        problems = list(self.unexpected)
        lost: list[str] = []
        outcomes: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        for i, job_id in sorted(self.ids.items()):
            job = await self._settled(http, job_id)
            status, body = await self._get(http, f"/jobs/{job_id}/events")
            types = [e["type"] for e in body.get("events", [])]
            seen.update(types)
            finals = [t for t in types if t in FINAL_DOWNLOAD_EVENTS]
            want = "Failed" if kind_of(i) == "bad" else "Success"
            delivered = job.get("callback_state") == "Success" and job_id in self.peers.callbacks
            if job["_status"] != 200 or status != 200 or len(finals) != 1 or not delivered:
                lost.append(
                    f"job {i} ({job_id}): {job.get('download_state')}/"
                    f"{job.get('callback_state')}, final events {finals}, "
                    f"callbacks {self.peers.callbacks[job_id]}"
                )
                continue
            outcomes[job["download_state"]] += 1
            if job["download_state"] != want:
                problems.append(f"job {i} ({job_id}) is {job['download_state']}, not {want}")
            if self.peers.payloads[job_id]["success"] != (want == "Success"):
                problems.append(f"job {i} ({job_id}) called back {self.peers.payloads[job_id]}")
        lost += [f"job {i}: never accepted" for i in range(self.spec.jobs) if i not in self.ids]
        in_redis = await self._count_jobs()
        if in_redis != len(self.ids):
            problems.append(f"Redis holds {in_redis} jobs for {len(self.ids)} accepted")
        dups = {j: n - 1 for j, n in self.peers.callbacks.items() if n > 1}
        return ChaosResult(
            jobs=self.spec.jobs,
            kills=sum(self.kills.values()),
            kills_by_role=dict(self.kills),
            jobs_in_redis=in_redis,
            lost=len(lost),
            lost_examples=lost[:10],
            problems=problems[:20],
            duplicate_callbacks=sum(dups.values()),
            jobs_with_duplicates=len(dups),
            post_retries=self.post_retries,
            replayed_posts=self.replayed,
            requeued_downloads=seen["download.requeued"],
            extra_callback_attempts=seen["callback.attempted"] - len(self.ids),
            succeeded=outcomes["Success"],
            failed=outcomes["Failed"],
            submit_s=round(submit_s, 2),
            drain_s=None if drain_s is None else round(drain_s, 2),
            wall_s=round(wall_s, 2),
            seed=self.spec.seed,
        )

    async def _count_jobs(self) -> int:
        storage = _storage(chaos_config(self.redis_addr, self.workdir, self.cluster))
        try:
            return sum([len(await storage.job_ids(s)) for s in storage.all_shards])
        finally:
            await storage.close()


def _storage(raw: dict[str, Any]) -> Storage:
    """A storage client of the run's own config (its Redis, its shards)."""
    config = Config.model_validate(raw)
    return Storage(connect(config), config)


def summary(result: ChaosResult) -> str:
    roles = ", ".join(f"{r} {n}" for r, n in sorted(result.kills_by_role.items()))
    drain = "NOT drained" if result.drain_s is None else f"drained {result.drain_s} s"
    return (
        f"chaos: {result.jobs} jobs, {result.kills} kills ({roles}); lost {result.lost}; "
        f"duplicate callbacks {result.duplicate_callbacks} ({result.jobs_with_duplicates} jobs); "
        f"{drain} after the last kill; "
        f"{result.succeeded} succeeded, {result.failed} failed as scripted; "
        f"POST retries {result.post_retries} ({result.replayed_posts} replayed); "
        f"{result.requeued_downloads} downloads requeued, "
        f"{result.extra_callback_attempts} extra callback attempts; "
        f"submit {result.submit_s} s, wall {result.wall_s} s"
    )


async def _bench(spec: ChaosSpec) -> ChaosResult:
    tmp = Path(tempfile.mkdtemp(prefix="dl-bench-chaos-"))
    redis = EmbeddedRedis(tmp / "redis", "127.0.0.1", free_port())
    redis.start()
    try:
        return await Chaos(spec, redis.addr, tmp / "service").run()
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# -- notifier recovery ---------------------------------------------------------------------------


@dataclass
class RecoveryResult:
    """How long the callbacks a SIGKILLed notifier was delivering waited for another one."""

    callbacks: int
    delivered: int  # must equal callbacks
    first_s: float | None  # from the SIGKILL to the first held callback delivered again
    all_s: float | None  # to the last one; None: not within timeout_s
    restart_s: float  # from the SIGKILL until the new notifier process was started
    timeout_s: float
    callback_states: dict[str, int]
    notifier_config: dict[str, Any]


def recovery_config(redis_addr: str, workdir: Path) -> dict[str, Any]:
    """The notifier keeps its defaults (the timers under test); the rest is made quick."""
    return {
        "redis": {"addr": redis_addr},
        "api": {"heartbeat_path": str(workdir / "hb-off")},
        "processor": {
            "storage_dir": str(workdir / "files"),
            "download_url": "http://files.test/dl",
            "stats_interval": 200,
        },
        "notifier": {"deletion_interval": 0.005},
        "backends": {"http": {"timeout": 300}},  # a held callback must not time out first
        "security": {"allow_private_networks": True},
        "log": {"level": "warning"},
    }


async def notifier_recovery(
    redis_addr: str, workdir: Path, callbacks: int = 10, timeout_s: float = 300.0
) -> RecoveryResult:
    """SIGKILL a notifier holding `callbacks` callbacks in flight, start a new one, and time
    the redelivery of every held callback."""
    raw = recovery_config(redis_addr, workdir)
    config = _write_config(workdir / "recovery-config.json", raw)
    origin = Peers(0.0, 0.0, 1)
    receiver = HoldingReceiver()
    api, processor = Proc("api", 0, config, workdir), Proc("processor", 0, config, workdir)
    first, second = Proc("notifier", 0, config, workdir), Proc("notifier", 1, config, workdir)
    procs = [api, processor, first, second]
    try:
        await origin.start()
        await receiver.start()
        for p in (api, processor, first):
            p.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            await _wait_api(http, api)
            ids = []
            for i in range(callbacks):
                body = {
                    "aggr_id": "recovery",
                    "aggr_limit": callbacks,
                    "url": origin.url(f"/origin/ok/job{i}"),
                    "callback_url": receiver.url("/cb"),
                }
                async with http.post(f"http://127.0.0.1:{api.port}/download", json=body) as r:
                    assert r.status == 201, await r.text()
                    ids.append(str((await r.json())["id"]))
            await receiver.wait(lambda: len(receiver.held) == callbacks, timeout_s=60)
            killed_at = time.monotonic()
            first.kill()
            second.start()
            restart_s = time.monotonic() - killed_at
            with contextlib.suppress(TimeoutError):
                await receiver.wait(lambda: len(receiver.delivered_at) == callbacks, timeout_s)
            times = sorted(t - killed_at for t in receiver.delivered_at.values())
            states = await _callback_states(raw, ids)
        return RecoveryResult(
            callbacks=callbacks,
            delivered=len(times),
            first_s=round(times[0], 2) if times else None,
            all_s=round(times[-1], 2) if len(times) == callbacks else None,
            restart_s=round(restart_s, 3),
            timeout_s=timeout_s,
            callback_states=dict(states),
            notifier_config=raw["notifier"],
        )
    finally:
        for p in procs:
            p.stop()
        await receiver.close()
        await origin.close()


async def _callback_states(raw: dict[str, Any], ids: list[str]) -> Counter[str]:
    """The jobs' callback_state once all are recorded (the receiver sees a callback a moment
    before the notifier records it), or as they are after 10 s."""
    storage = _storage(raw)
    try:
        for _ in range(100):  # bounded: ~10 s
            states = Counter([str((await storage.get_job(j)).callback_state) for j in ids])
            if set(states) <= {"Success", "Failed"}:
                break
            await asyncio.sleep(0.1)
    finally:
        await storage.close()
    return states


def _write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


async def _wait_api(http: aiohttp.ClientSession, api: Proc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(f"http://127.0.0.1:{api.port}/hb") as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the api did not come up:\n{api.log_tail()}")
        await asyncio.sleep(0.1)


def recovery_summary(result: RecoveryResult) -> str:
    done = "NOT all" if result.all_s is None else f"all {result.callbacks} in {result.all_s} s"
    return (
        f"notifier recovery: {result.delivered}/{result.callbacks} held callbacks delivered again "
        f"after the SIGKILL; first in {result.first_s} s, {done} "
        f"(new notifier started {result.restart_s} s after the kill); "
        f"callback_state {result.callback_states}"
    )


async def _bench_recovery(callbacks: int, timeout_s: float) -> RecoveryResult:
    tmp = Path(tempfile.mkdtemp(prefix="dl-bench-recovery-"))
    redis = EmbeddedRedis(tmp / "redis", "127.0.0.1", free_port())
    redis.start()
    try:
        return await notifier_recovery(redis.addr, tmp / "service", callbacks, timeout_s)
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _write(path: Path, spec: dict[str, Any], result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    meta = {"commit": commit or "unknown", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps({**meta, "spec": spec, **result}, indent=2) + "\n")
    print(f"written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--aggregations", type=int, default=20)
    parser.add_argument("--aggr-limit", type=int, default=3)
    parser.add_argument("--min-kills", type=int, default=20)
    parser.add_argument("--submit-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--notifier-recovery",
        action="store_true",
        help="only time the redelivery of a SIGKILLed notifier's callbacks",
    )
    parser.add_argument("--callbacks", type=int, default=10, help="with --notifier-recovery")
    parser.add_argument("--timeout", type=float, default=300.0, help="with --notifier-recovery")
    args = parser.parse_args()
    if args.notifier_recovery:
        recovery = asyncio.run(_bench_recovery(args.callbacks, args.timeout))
        print(recovery_summary(recovery))
        spec_r = {"callbacks": args.callbacks, "timeout_s": args.timeout}
        _write(args.output or RECOVERY_RESULTS, spec_r, asdict(recovery))
        return 0 if recovery.all_s is not None else 1
    spec = ChaosSpec(
        jobs=args.jobs,
        aggregations=args.aggregations,
        aggr_limit=args.aggr_limit,
        min_kills=args.min_kills,
        submit_s=args.submit_seconds,
        seed=args.seed,
    )
    result = asyncio.run(_bench(spec))
    print(summary(result))
    for line in result.lost_examples + result.problems:
        print("  ", line)
    _write(args.output or RESULTS, asdict(spec), asdict(result))
    return 0 if result.lost == 0 and not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
