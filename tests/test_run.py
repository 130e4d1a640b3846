"""`downloader run` on a shared machine: it embeds only a Redis of its own and stops when that one
dies, stops in one line when a port is taken, says where to go once ready; and the README's quick
start works as pasted (`make run` installs no dev tools, JSON answers end with a newline)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from downloader.config import Config
from downloader.embedded import AddressInUse, EmbeddedRedis
from harness.redis_nodes import StrRedis
from harness.servers import CallbackReceiver, FileServer, free_port, until, wait_http
from tests.conftest import ROOT, Proc, Service

MakeConfig = Callable[..., tuple[Path, Config]]
Spawn = Callable[..., Proc]


def embedding_config(make_config: MakeConfig, tmp_path: Path, **patch: Any) -> Path:
    """A config whose redis.addr is a free loopback port, so `run` embeds a Redis there."""
    redis = {"addr": f"127.0.0.1:{free_port()}", "embedded_dir": str(tmp_path / "redis")}
    path, _config = make_config({"redis": redis, "log": {"level": "info"}, **patch}, "embed.json")
    return path


def embedded_pid(proc: Proc) -> int:
    found = re.search(r"started embedded redis.*\bpid=(\d+)", proc.log())
    assert found, proc.log()
    return int(found.group(1))


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids of embedded redis-servers to kill at the end, should a test leave one behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def exit_code(proc: Proc, timeout_s: float = 30) -> int:
    assert proc.popen is not None
    return await asyncio.to_thread(proc.popen.wait, timeout_s)


def text_lines(proc: Proc) -> list[str]:
    return [line for line in proc.log().splitlines() if line.strip()]


# -- the embedded Redis: its own, or none ------------------------------------------------------


async def test_embedding_where_a_redis_answers_is_refused_naming_it(
    redis_server: EmbeddedRedis, redis_client: StrRedis, tmp_path: Path
) -> None:
    """An embedded Redis is refused on a port where another Redis answers; that one is named and
    its data left alone."""
    await redis_client.set("theirs", "kept")
    mine = EmbeddedRedis(tmp_path / "mine", redis_server.host, redis_server.port)
    with pytest.raises(AddressInUse) as refused:
        await asyncio.to_thread(mine.start)
    assert redis_server.proc is not None
    assert str(refused.value).startswith(
        f"{redis_server.addr} is already in use by a redis-server (pid {redis_server.proc.pid}"
    )
    assert mine.proc is None
    assert not (tmp_path / "mine").exists()
    assert await redis_client.get("theirs") == "kept"


async def test_run_refuses_to_embed_on_a_taken_port_in_one_line(
    spawn: Spawn, make_config: MakeConfig, tmp_path: Path
) -> None:
    """`run` whose Redis port is held by another program exits 2 with one line naming the port,
    and starts no redis-server."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers, yet it is taken
        port = holder.getsockname()[1]
        path, _ = make_config(
            {"redis": {"addr": f"127.0.0.1:{port}", "embedded_dir": str(tmp_path / "redis")}}
        )
        proc = spawn("run", path, free_port())
        assert await exit_code(proc) == 2
    assert text_lines(proc) == [
        f"error: 127.0.0.1:{port} is already in use, so no Redis can be embedded there; "
        "stop it, or set redis.addr to a free port"
    ]
    assert not (tmp_path / "redis" / "redis.log").exists()


async def test_run_says_when_its_embedded_redis_dies_starting(
    spawn: Spawn, make_config: MakeConfig, tmp_path: Path
) -> None:
    """`run` whose embedded redis-server exits at start-up (a corrupt AOF) exits 2 saying so,
    with the end of the server's log and no traceback."""
    path = embedding_config(make_config, tmp_path)
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "appendonly.aof").write_bytes(b"*garbage\r\n")
    proc = spawn("run", path, free_port())
    assert await exit_code(proc) == 2
    out = proc.log()
    assert "error: embedded redis-server exited with code 1 while starting" in out, out
    assert "Bad file format reading the append only file" in out
    assert "Traceback" not in out
    assert "api listening" not in out


async def test_run_stops_when_its_embedded_redis_dies(
    spawn: Spawn, make_config: MakeConfig, tmp_path: Path, reap: list[int]
) -> None:
    """`run` whose embedded redis-server is SIGKILLed logs one error naming it and exits non-zero
    instead of carrying on against a dead Redis."""
    port = free_port()
    proc = spawn("run", embedding_config(make_config, tmp_path), port)
    await wait_http(f"http://127.0.0.1:{port}/hb")
    child = embedded_pid(proc)
    reap.append(child)
    os.kill(child, signal.SIGKILL)
    assert await exit_code(proc) == 1
    died = [line for line in text_lines(proc) if "embedded redis-server exited" in line]
    assert len(died) == 1, proc.log()
    assert "exit_code=-9" in died[0]
    assert "Traceback" not in proc.log()


async def test_run_on_a_redis_that_answers_uses_it_and_says_so(
    spawn: Spawn, make_config: MakeConfig, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """`run` whose redis.addr answers logs `using redis` with that address and embeds nothing."""
    path, _ = make_config({"log": {"level": "info"}, "redis": {"embedded_dir": str(tmp_path)}})
    port = free_port()
    proc = spawn("run", path, port)
    await wait_http(f"http://127.0.0.1:{port}/hb")
    assert proc.terminate() == 0
    out = proc.log()
    assert re.search(rf"using redis\s.*addr={re.escape(redis_server.addr)}", out), out
    assert "embedded" not in out
    assert not (tmp_path / "redis.log").exists()


async def test_run_leaves_its_embedded_redis_running_until_its_own_stop(
    spawn: Spawn, make_config: MakeConfig, tmp_path: Path, reap: list[int]
) -> None:
    """SIGINT (a Ctrl-C) stops `run` with exit 0 and its embedded redis-server with it, without
    reporting the server's exit as a failure."""
    port = free_port()
    proc = spawn("run", embedding_config(make_config, tmp_path), port)
    await wait_http(f"http://127.0.0.1:{port}/hb")
    child = embedded_pid(proc)
    reap.append(child)
    assert proc.popen is not None
    proc.popen.send_signal(signal.SIGINT)
    assert await exit_code(proc) == 0
    assert "embedded redis-server exited" not in proc.log()
    with pytest.raises(ProcessLookupError):  # stopped and reaped before `run` exited
        os.kill(child, 0)


# -- the API port --------------------------------------------------------------------------------


@pytest.mark.parametrize("holder", ["another downloader", "another program"])
async def test_second_run_on_a_taken_api_port_stops_in_one_line(
    spawn: Spawn, make_config: MakeConfig, holder: str
) -> None:
    """A `run` whose API port is taken exits 2 with one line saying what holds it, before it
    starts Redis, a processor or a notifier; the first one carries on."""
    path, _ = make_config({"log": {"level": "info"}})
    port = free_port()
    with socket.socket() as other:
        if holder == "another downloader":
            first = spawn("run", path, port)
            await wait_http(f"http://127.0.0.1:{port}/hb")
        else:
            other.bind(("127.0.0.1", port))
            other.listen()
        second = spawn("run", path, port)
        assert await exit_code(second) == 2
    assert text_lines(second) == [
        f"error: 127.0.0.1:{port} is already in use by {holder}; stop it, or set api.port or --port"
    ]
    if holder == "another downloader":
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/hb") as r:
            assert r.status == 200
        assert first.terminate() == 0


async def test_processor_with_a_taken_metrics_port_stops_in_one_line(
    spawn: Spawn, make_config: MakeConfig
) -> None:
    """A processor whose metrics_port is taken exits 2 with one line naming the key."""
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        path, _ = make_config({"processor": {"metrics_port": port}})
        proc = spawn("processor", path)
        assert await exit_code(proc) == 2
    assert text_lines(proc) == [
        f"error: processor.metrics_port {port} is already in use; stop it or set another"
    ]


# -- what a new user sees ------------------------------------------------------------------------


async def test_run_says_where_the_dashboard_is_once_ready(
    spawn: Spawn, make_config: MakeConfig
) -> None:
    """Once ready, `run` prints the dashboard URL and a command to try, plain even when its logs
    are JSON; the command works."""
    path, _ = make_config({"log": {"format": "json", "level": "info"}})
    port = free_port()
    proc = spawn("run", path, port)
    await until(lambda: "  try:" in proc.log(), timeout=30)
    plain = [line for line in text_lines(proc) if not line.startswith("{")]
    url = f"http://127.0.0.1:{port}/"
    assert plain == [
        "downloader is running (Ctrl-C stops it)",
        f"  dashboard: {url}",
        f"  try:       curl -s {url}dashboard/instances  (then the demo in README.md, Quick start)",
    ]
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            assert "text/html" in r.headers["Content-Type"]
        async with s.get(f"{url}dashboard/instances") as r:
            assert r.status == 200
            assert isinstance(await r.json(), list)
    assert proc.terminate() == 0


async def test_json_answers_end_with_a_newline(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Every JSON answer of the API ends with a newline, so a shell prompt after `curl -s` starts
    on a line of its own: a 201, a job, its events, a list, stats and a 4xx error."""
    assert service.http is not None
    base = service.base_url
    job = {"aggr_id": "nl", "aggr_limit": 1, "url": files.add("/nl", b"x")}
    async with service.http.post(
        f"{base}/download", json=job | {"callback_url": receiver.url("/cb")}
    ) as r:
        bodies = [(r.status, await r.read())]
    job_id = json.loads(bodies[0][1])["id"]
    async with service.http.post(f"{base}/download", data=b"{") as r:
        bodies.append((r.status, await r.read()))
    for path in (
        f"/jobs/{job_id}",
        f"/jobs/{job_id}/events",
        "/dashboard/aggregations",
        "/dashboard/instances",
        "/stats/processor",
        "/jobs/nosuchjob",
    ):
        async with service.http.get(base + path) as r:
            bodies.append((r.status, await r.read()))
    assert [status for status, _ in bodies] == [201, 400, 200, 200, 200, 200, 200, 404]
    for _status, body in bodies:
        assert body.endswith(b"\n") and not body.endswith(b"\n\n"), body
        json.loads(body)


def test_make_run_installs_no_dev_tools(tmp_path: Path) -> None:
    """`make run` installs the package alone; `make test` adds the dev extras (pytest, moto)."""

    def plan(target: str) -> str:
        venv = f"VENV={tmp_path / 'venv'}"
        done = subprocess.run(
            ["make", "-n", "-C", str(ROOT), target, venv], capture_output=True, text=True
        )
        return done.stdout

    run = plan("run")
    assert re.search(r"pip install -q -e \.$", run, re.M), run
    assert "[dev]" not in run
    assert "pip install -q -e '.[dev]'" in plan("test")


QUICK_START = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
BLOCKS = re.findall(r"```sh\n(.*?)```", QUICK_START, re.S)


def test_quick_start_puts_make_run_alone_and_make_test_elsewhere() -> None:
    """The quick start's `make run` is a block of its own (it does not return), and `make test`
    is not in the quick start at all."""
    assert BLOCKS[0].strip() == "make run"
    assert "make test" not in QUICK_START
    assert "make test" in (ROOT / "README.md").read_text()


def run_shell(script: str, out_path: Path, timeout_s: float) -> int:
    """Run `script` with bash in the repository; kill it and whatever it started at the end."""
    with open(out_path, "wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        return shell.wait(timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)


async def test_quick_start_demo_works_as_pasted(
    spawn: Spawn, make_config: MakeConfig, tmp_path: Path
) -> None:
    """The quick start's demo blocks, pasted one after the other into one shell (only the ports
    and the demo directory changed), download the file, call back and show the finished job."""
    helpers, submit, look = BLOCKS[1:4]
    api, origin, receiver = free_port(), free_port(), free_port()
    # the file kept its default hour: the tests' 0.3 s could delete it before the last look
    path, _ = make_config({"notifier": {"deletion_interval": 60}})
    proc = spawn("run", path, api)
    await wait_http(f"http://127.0.0.1:{api}/hb")
    script = "\n".join(
        [
            helpers,
            # "Once both say they are listening"
            f"until curl -s -o /dev/null http://127.0.0.1:{origin}/ &&"
            f" curl -s -o /dev/null http://127.0.0.1:{receiver}/; do sleep 0.05; done",
            submit,
            # "The receiver prints the callback"
            f"until grep -q '^POST /cb' {tmp_path / 'out'}; do sleep 0.05; done",
            look,
            'kill %1 %2; wait; echo "demo done"',
        ]
    )
    for old, new in (
        ("127.0.0.1:8000", f"127.0.0.1:{api}"),
        ("9000", str(origin)),
        ("9001", str(receiver)),
        ("/tmp/demo", str(tmp_path / "demo")),
        (".venv/bin/downloader", str(Path(sys.executable).parent / "downloader")),
    ):
        assert old in script
        script = script.replace(old, new)
    assert await asyncio.to_thread(run_shell, script, tmp_path / "out", 40) == 0
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines[-1] == "demo done"
    [callback] = [line for line in lines if line.startswith("POST /cb ")]
    assert json.loads(callback.removeprefix("POST /cb "))["success"] is True
    [job_id] = [line for line in lines if re.fullmatch(r"[A-Za-z0-9]{14}", line)]
    [job] = [
        json.loads(line)
        for line in lines
        if line.startswith('{"') and '"url"' in line[:400] and not line.startswith('{"events"')
    ]
    assert (job["id"], job["download_state"], job["callback_state"]) == (
        job_id,
        "Success",
        "Success",
    )
    [events] = [json.loads(line) for line in lines if line.startswith('{"events"')]
    assert [e["type"] for e in events["events"]][-1] == "callback.delivered"
    assert proc.terminate() == 0
