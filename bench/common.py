"""Shared benchmark plumbing: a private Redis, the service as real OS processes, and the peers.

Everything listens on 127.0.0.1 only. The "peers" (the origin file server and the callback
receiver) run in their own OS process (`python bench/common.py peers ...`) so that the
benchmark driver's own work (firing POSTs) cannot delay how arrivals are timestamped. Times
on both sides are `time.monotonic()`, i.e. CLOCK_MONOTONIC, which is one clock for every
process of the machine, so a POST time taken here and a callback time taken there compare.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS_DIR = BENCH / "results"
CACHE_DIR = ROOT / ".cache" / "bench"  # git-ignored; the 1 GiB origin file lives here
STACKS_DIR = CACHE_DIR / "stacks"  # one temp dir per Stack (Redis data, storage), removed after
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL_BODY_BYTES = 10 * 1024

if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first; the service is in ROOT
    sys.path.insert(0, str(ROOT))

from downloader.embedded import EmbeddedRedis, find_redis_server  # noqa: E402
from harness.servers import free_port  # noqa: E402


def cpu_ticks() -> tuple[int, int, int]:
    """Machine-wide (busy, steal, total) jiffies from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    steal = v[7] if len(v) > 7 else 0
    return sum(v) - idle, steal, sum(v)


def busy_cores(before: tuple[int, int, int], after: tuple[int, int, int]) -> dict[str, float]:
    """How many cores were busy (and stolen by the hypervisor) between two cpu_ticks()."""
    total = max(1, after[2] - before[2])
    cores = os.cpu_count() or 1
    return {
        "busy_cores": round(cores * (after[0] - before[0]) / total, 2),
        "steal_cores": round(cores * (after[1] - before[1]) / total, 2),
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# -- /proc sampling ------------------------------------------------------------------------------


def cpu_user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far."""
    return sum(cpu_user_sys(pid))


def vm_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """Sample a process's VmRSS every `interval_s` in the background, keeping the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> RssSampler:
        self.samples.append(vm_kib(self.pid, "VmRSS"))
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for _ in range(int(600 / self.interval_s)):  # bounded: 10 minutes at most
            await asyncio.sleep(self.interval_s)
            self.samples.append(vm_kib(self.pid, "VmRSS"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.samples.append(vm_kib(self.pid, "VmRSS"))

    @property
    def baseline_kib(self) -> int:
        return self.samples[0]

    @property
    def peak_kib(self) -> int:
        return max(self.samples)


class BenchRedis(EmbeddedRedis):
    """The embedded redis-server (AOF on, as `make run` has it), from `executable` if given
    (e.g. another Redis version) instead of the one `find_redis_server` picks."""

    def __init__(self, data_dir: Path, host: str, port: int, executable: str | None = None) -> None:
        super().__init__(data_dir, host, port)
        self.executable = executable or find_redis_server()

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        args = [
            *("--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir)),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
            *("--protected-mode", "no"),
        ]
        return subprocess.Popen(
            [self.executable, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


# -- configuration -------------------------------------------------------------------------------


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_config(redis_addr: str, tmp: Path) -> dict[str, Any]:
    """Production-like timers (no millisecond polling that would flatter or burden the run),
    loopback allowed, quiet logs, files under `tmp`."""
    return {
        "redis": {"addr": redis_addr},
        "api": {"heartbeat_path": str(tmp / "hb-off")},
        "processor": {
            "storage_dir": str(tmp / "files"),
            "download_url": "http://127.0.0.1/files",
            "stats_interval": 1000,
        },
        "notifier": {"concurrency": 20, "stats_interval": 1000},
        "backends": {"http": {"timeout": 10}},
        "security": {"allow_private_networks": True},
        "log": {"level": "warning"},
    }


# -- processes ---------------------------------------------------------------------------------


class Role:
    """One `downloader <role>` OS process."""

    def __init__(
        self,
        role: str,
        config: Path,
        log: Path,
        port: int | None = None,
        profile: Path | None = None,
    ) -> None:
        self.role, self.config, self.log_path, self.port = role, config, log, port
        self.profile = profile  # write a cProfile dump here when the process exits
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Role:
        prof = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        args = [PYTHON, *prof, "-m", "downloader", self.role, "-c", str(self.config)]
        if self.port is not None:
            args += ["--port", str(self.port), "--host", "127.0.0.1"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 15) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


TOPOLOGIES = {
    "api": ("api",),
    "run": ("run",),
    "split": ("api", "processor", "notifier"),
}


class Stack:
    """A private redis-server + the service in one of TOPOLOGIES, in a fresh temp dir.

    `async with Stack("split") as s:` -> s.base_url, s.roles["processor"].pid, s.storage_dir.
    With `profile_dir`, every role runs under cProfile and leaves `<role>.prof` there;
    `redis_server` is the redis-server binary to run (default: the suite's)."""

    def __init__(
        self,
        topology: str,
        patch: dict[str, Any] | None = None,
        profile_dir: Path | None = None,
        redis_server: str | None = None,
    ) -> None:
        self.topology = topology
        self.patch = patch or {}
        self.profile_dir = profile_dir
        # Under the repo, like `make run`'s var/, not /tmp: on the benchmark VM creating a file
        # in a fresh directory under /tmp costs 441 us of CPU against 71 us under /work
        # (bench/README.md), which is the filesystem, not the service.
        STACKS_DIR.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{topology}-", dir=STACKS_DIR))
        self.redis = BenchRedis(self.tmp / "redis", "127.0.0.1", free_port(), redis_server)
        self.roles: dict[str, Role] = {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config: dict[str, Any] = {}

    @property
    def storage_dir(self) -> Path:
        return Path(self.config["processor"]["storage_dir"])

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.stop()

    async def start(self) -> None:
        self.redis.start()
        self.config = merge(bench_config(self.redis.addr, self.tmp), self.patch)
        path = self.tmp / "config.json"
        path.write_text(json.dumps(self.config, indent=2))
        for role in TOPOLOGIES[self.topology]:
            port = self.port if role in ("api", "run") else None
            prof = None
            if self.profile_dir is not None:
                self.profile_dir.mkdir(parents=True, exist_ok=True)
                prof = self.profile_dir / f"{role}.prof"
            self.roles[role] = Role(role, path, self.tmp / f"{role}.log", port, prof).start()
        await self._wait_ready()

    async def _wait_ready(self, timeout_s: float = 30.0) -> None:
        """The API answers /hb, and every processor/notifier has published its first stats."""
        want = {"processor", "notifier"} if self.topology != "api" else set()
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                for role in self.roles.values():
                    if not role.alive():
                        raise RuntimeError(f"{role.role} exited:\n{role.log_tail()}")
                try:
                    async with http.get(self.base_url + "/hb") as r:
                        ok = r.status == 200
                    if ok and want:
                        async with http.get(self.base_url + "/dashboard/instances") as r:
                            live = {m.split(":", 1)[0] for m in await r.json()}
                        ok = want <= live
                    if ok:
                        break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {r.role}\n{r.log_tail()}" for r in self.roles.values())
                    raise TimeoutError(f"the service did not come up:\n{tails}")
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the wake/consume loops reach their blocking reads

    def stop(self) -> None:
        for role in reversed(list(self.roles.values())):
            role.stop()
        unclean = [
            r.role for r in self.roles.values() if r.popen and r.popen.returncode not in (0, None)
        ]
        if unclean:
            print(f"  note: {unclean} did not exit 0", file=sys.stderr)
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each role process and by redis."""
        out = {name: cpu_seconds(r.pid) for name, r in self.roles.items() if r.alive()}
        if self.redis.proc is not None:
            out["redis"] = cpu_seconds(self.redis.proc.pid)
        return out


# -- peers: origin + callback receiver, in their own process ------------------------------------


class Peers:
    """Handle on the peers process: `origin_url(path)`, `callback_url(name)`, `callbacks()`."""

    def __init__(self, big_file: Path | None = None) -> None:
        self.port = free_port()
        self.big_file = big_file
        self.popen: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="dl-bench-peers-", suffix=".log")
        os.close(fd)
        self.log = Path(name)

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [PYTHON, str(Path(__file__).resolve()), "peers", "--port", str(self.port)]
        if self.big_file is not None:
            args += ["--big", str(self.big_file)]
        with open(self.log, "ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    async def __aenter__(self) -> Peers:
        self.popen = self._spawn()
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as http:
            while True:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"peers exited: {self.log.read_text(errors='replace')}")
                try:
                    async with http.get(self.base + "/_ping") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("peers did not start")
                await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.log.unlink(missing_ok=True)

    def cpu(self) -> float:
        assert self.popen is not None
        return cpu_seconds(self.popen.pid)

    def origin_url(self, path: str) -> str:
        return f"{self.base}/origin/{path.lstrip('/')}"

    def callback_url(self, name: str = "cb") -> str:
        return f"{self.base}/callback/{name}"

    async def _get(self, path: str, timeout_s: float = 60) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s + 5)) as http,
            http.get(self.base + path) as r,
        ):
            r.raise_for_status()
            return await r.json()

    async def wait_callbacks(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """Block until `count` callbacks arrived (or the timeout); all receipts so far."""
        return list(await self._get(f"/_callbacks?count={count}&timeout={timeout_s}", timeout_s))

    async def origin_hits(self) -> dict[str, float]:
        """First arrival time of each origin path."""
        return dict(await self._get("/_hits"))

    async def reset(self) -> None:
        await self._get("/_reset")


def run_peers(port: int, big: str | None) -> None:
    """The peers process: an origin (in-memory bodies; the big file with sendfile) and a
    callback receiver that timestamps each arrival on CLOCK_MONOTONIC as it is read."""
    from aiohttp import web

    small = (bytes(range(256)) * (SMALL_BODY_BYTES // 256 + 1))[:SMALL_BODY_BYTES]
    hits: dict[str, float] = {}
    receipts: list[dict[str, Any]] = []
    arrived = asyncio.Condition()

    async def origin(request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        path = request.match_info["tail"]
        hits.setdefault(path, now)
        kind, _, _rest = path.partition("/")
        if kind == "ok":
            return web.Response(body=small, content_type="application/octet-stream")
        if kind == "status":
            return web.Response(status=int(_rest.partition("/")[0]), text="scripted")
        if kind == "big" and big:
            return web.FileResponse(big, headers={"Content-Type": "application/octet-stream"})
        return web.Response(status=404, text="not found")

    async def callback(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        payload = json.loads(body)
        async with arrived:
            receipts.append(
                {
                    "t": now,
                    "job_id": payload.get("job_id"),
                    "success": payload.get("success"),
                    "response_code": payload.get("response_code"),
                    "error": payload.get("error"),
                }
            )
            arrived.notify_all()
        return web.Response(text="ok")

    async def list_callbacks(request: web.Request) -> web.Response:
        count = int(request.query.get("count", "0"))
        timeout_s = float(request.query.get("timeout", "0"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), arrived:
                await arrived.wait_for(lambda: len(receipts) >= count)
        return web.json_response(receipts)

    async def list_hits(_r: web.Request) -> web.Response:
        return web.json_response(hits)

    async def reset(_r: web.Request) -> web.Response:
        hits.clear()
        receipts.clear()
        return web.json_response({})

    async def ping(_r: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/origin/{tail:.*}", origin)
    app.router.add_post("/callback/{tail:.*}", callback)
    app.router.add_get("/_callbacks", list_callbacks)
    app.router.add_get("/_hits", list_hits)
    app.router.add_get("/_reset", reset)
    app.router.add_get("/_ping", ping)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the big file ------------------------------------------------------------------------------


def big_file(size: int = 1 << 30) -> Path:
    """A `size`-byte file of real pseudo-random bytes (no holes), written once and reused."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"origin-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    print(f"  writing {size / 2**20:.0f} MiB of random bytes to {path} (once) ...", flush=True)
    part = path.with_suffix(".part")
    block = 8 << 20
    with open(part, "wb") as f:
        for _ in range(size // block):
            f.write(os.urandom(block))
        f.write(os.urandom(size % block))
        f.flush()
        os.fsync(f.fileno())
    part.rename(path)
    return path


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` -> t[0] is the elapsed seconds afterwards."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def save_json(name: str, data: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="bench helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peers", help="run the origin + callback receiver")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--big", default=None)
    args = parser.parse_args()
    if args.cmd == "peers":
        run_peers(args.port, args.big)


if __name__ == "__main__":
    main()
