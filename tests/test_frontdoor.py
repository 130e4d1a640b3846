"""The API's front door, against real `downloader` processes on loopback: who may listen where
without tokens, browser origins, connection caps and request deadlines, metrics addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from downloader.cli import _is_loopback
from downloader.config import Config
from harness.redis_nodes import StrRedis, data_keys
from harness.servers import free_port, wait_http
from tests.conftest import ROOT, Proc, Service, start_api

ServiceFactory = Callable[..., Any]
MakeConfig = Callable[..., tuple[Path, Config]]
Spawn = Callable[..., Proc]

BODY = {
    "aggr_id": "a1",
    "aggr_limit": 2,
    "url": "http://origin.test/a.png",
    "callback_type": "http",
    "callback_dst": "http://receiver.test/cb",
}


Cli = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def cli() -> Iterator[Cli]:
    """`cli(*args, **popen)`: `python -m downloader ...` as a real process, its output captured.
    Any still running at the end is killed (a test that failed before reaping it leaks none)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, **popen: Any) -> subprocess.Popen[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DOWNLOADER__")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "downloader", *args],
            cwd=ROOT,
            env=clean,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)  # reaps it and closes its pipes


# -- listening without tokens (finding 3) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("api.example.com", False),
    ],
)
def test_loopback_addresses_are_told_from_the_others(host: str, loopback: bool) -> None:
    """Only localhost, 127.0.0.0/8 and ::1 (also IPv4-mapped) count as this machine only."""
    assert _is_loopback(host) is loopback


def test_api_refuses_to_listen_beyond_loopback_without_tokens(
    make_config: MakeConfig, cli: Cli
) -> None:
    """`api --host 0.0.0.0` with no api.tokens exits 2 with one line naming the keys; so does
    `run`, and `check` of a config whose api.host is such an address."""
    path, _ = make_config()
    for args in (("api", "--host", "0.0.0.0"), ("run", "--host", "::")):
        proc = cli(*args, "--port", str(free_port()), "-c", str(path))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "api.tokens" in err and "api.allow_anonymous" in err, err
    exposed, _ = make_config({"api": {"host": "0.0.0.0"}}, name="exposed.json")
    proc = cli("check", "-c", str(exposed))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "api.tokens" in err, err


@pytest.mark.parametrize(
    "api",
    [
        pytest.param({"tokens": ["s3cret"]}, id="tokens"),
        pytest.param({"allow_anonymous": True}, id="allow-anonymous"),
    ],
)
async def test_api_listens_beyond_loopback_with_tokens_or_allow_anonymous(
    make_config: MakeConfig, cli: Cli, api: dict[str, Any]
) -> None:
    """With tokens, or with allow_anonymous said out loud, `api --host 0.0.0.0` starts."""
    path, _ = make_config({"api": api})
    port = free_port()
    proc = cli("api", "--host", "0.0.0.0", "--port", str(port), "-c", str(path))
    try:
        await wait_http(f"http://127.0.0.1:{port}/hb")
        check = cli("check", "-c", str(path))
        check.communicate(timeout=60)
        assert check.returncode == 0
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# -- browser origins (finding 3) ------------------------------------------------------------------


async def send(svc: Service, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
    """(status, headers, decoded JSON or None)."""
    assert svc.http is not None
    async with svc.http.request(method, svc.base_url + path, **kw) as r:
        raw = await r.read()
        return r.status, r.headers, json.loads(raw) if raw.strip() else None


async def test_cross_site_pages_cannot_submit_jobs(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """A form-like cross-site POST (text/plain, no preflight) is 403 naming Origin and stores
    nothing, as is `Origin: null` and a preflight from such a page; callers without Origin, and
    pages of api.allowed_origins (with CORS headers and preflights), go through."""
    svc = await service_factory({"api": {"allowed_origins": ["https://App.Example:443"]}}, {"api"})
    text = json.dumps(BODY)
    for origin in ("https://evil.example", "null", "https://app.example.evil.example"):
        headers = {"Origin": origin, "Content-Type": "text/plain"}
        status, _h, body = await send(svc, "POST", "/download", data=text, headers=headers)
        assert (status, body["field"]) == (403, "Origin"), (origin, body)
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    status, headers, _body = await send(svc, "OPTIONS", "/download", headers=preflight)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert await data_keys(redis_client) == []

    status, headers, body = await send(svc, "POST", "/download", data=text)
    assert status == 201 and "Access-Control-Allow-Origin" not in headers, body
    allowed = {"Origin": "https://app.example", "Content-Type": "text/plain"}
    status, headers, body = await send(svc, "POST", "/download", data=text, headers=allowed)
    assert status == 201, body
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in headers.getall("Vary")
    status, headers, body = await send(svc, "POST", "/download", json={}, headers=allowed)
    assert status == 400 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    preflight["Origin"] = "https://app.example"
    status, headers, _body = await send(svc, "OPTIONS", "/download", headers=preflight)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]


async def test_without_allowed_origins_every_origin_is_refused(
    service_factory: ServiceFactory,
) -> None:
    """By default no browser page may call the API, not even one claiming the API's own origin;
    the dashboard's own GETs carry no Origin and work."""
    svc = await service_factory(None, {"api"})
    for origin in (svc.base_url, "http://localhost:8000"):
        status, _h, body = await send(svc, "GET", "/hb", headers={"Origin": origin})
        assert (status, body["field"]) == (403, "Origin")
    assert (await send(svc, "GET", "/dashboard/instances"))[0] == 200


# -- connections and deadlines (finding 6) --------------------------------------------------------


Connect = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`await connect(port, head=b"")`: a raw loopback connection that sent `head`; all are
    closed at the end."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one(
        port: int, head: bytes = b""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        if head:
            writer.write(head)
            await writer.drain()
        return reader, writer

    yield open_one
    for writer in writers:
        writer.close()


async def closed(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """Everything the server sent until it closed the connection; None if it stayed open."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def answer(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """An HTTP/1.1 answer as bytes: (status, headers, decoded JSON body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


async def healthy(api: str) -> None:
    """/hb answers 200 and a well-formed POST /download 201, each on a new connection."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(f"{api}/hb") as r:
            assert r.status == 200
        async with http.post(f"{api}/download", json=BODY) as r:
            assert r.status == 201, await r.text()


HALF_HEAD = b"POST /download HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"


async def test_half_open_sockets_beyond_the_cap_do_not_lock_others_out(
    make_config: MakeConfig, spawn: Spawn, connect: Connect
) -> None:
    """The review's attack at its size: with the default cap (1,000 connections), 1,100
    sockets that each sent half a request head leave /hb and POST /download answering; the
    oldest half-open ones are closed to make room. The header timeout is set far out (10 min),
    so any socket closed here was closed by the cap, not by a deadline, however slow the
    machine."""
    path, config = make_config({"api": {"header_timeout_seconds": 600}})
    assert config.api.max_connections == 1000
    api = await start_api(spawn, path)
    port = int(api.rsplit(":", 1)[1])
    sockets: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(11):  # in batches, within the listen backlog
        sockets += await asyncio.gather(*(connect(port, HALF_HEAD) for _ in range(100)))
    async with asyncio.timeout(60):  # a hang guard only
        await healthy(api)
    ended = await asyncio.gather(*(closed(r, 0.5) for r, _w in sockets))
    assert sum(e is not None for e in ended) >= 100, "the oldest half-open ones made room"


async def test_a_slow_request_head_is_closed_after_the_header_timeout(
    make_config: MakeConfig, spawn: Spawn, connect: Connect
) -> None:
    """A client that keeps sending its head a byte at a time is closed once
    api.header_timeout_seconds have passed; an idle keep-alive connection is not: the next
    request's head has its own deadline, from its first byte."""
    path, _ = make_config({"api": {"header_timeout_seconds": 0.3}})
    api = await start_api(spawn, path)
    port = int(api.rsplit(":", 1)[1])
    started = time.monotonic()
    reader, writer = await connect(port, b"GET /hb HTTP/1.1\r\n")

    async def trickle() -> None:
        for _ in range(400):
            writer.write(b"X")
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    assert await closed(reader, 20) == b"", "closed without an answer"
    assert time.monotonic() - started >= 0.3
    dripping.cancel()
    writer.close()

    reader, writer = await connect(port, b"GET /hb HTTP/1.1\r\nHost: api\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(2) == b"OK"
    await asyncio.sleep(1)  # idle for three header timeouts: the keep-alive time applies
    writer.write(b"GET /hb HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    raw = await closed(reader, 10)
    assert raw is not None and raw.startswith(b"HTTP/1.1 200")


async def test_a_slow_body_gets_408_and_its_connection_is_closed(
    make_config: MakeConfig, spawn: Spawn, connect: Connect, redis_client: StrRedis
) -> None:
    """A POST /download whose body does not arrive within api.body_timeout_seconds is answered
    408 naming the body, its connection is closed although bytes still trickle in, and nothing
    is stored."""
    path, _ = make_config({"api": {"body_timeout_seconds": 0.3}})
    api = await start_api(spawn, path)
    port = int(api.rsplit(":", 1)[1])
    text = json.dumps(BODY).encode()
    head = f"POST /download HTTP/1.1\r\nHost: api\r\nContent-Length: {len(text)}\r\n\r\n"
    reader, writer = await connect(port, head.encode() + text[:10])

    async def trickle() -> None:
        for byte in text[10:]:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    raw = await closed(reader, 20)
    dripping.cancel()
    writer.close()
    assert raw is not None, "the connection stayed open"
    status, headers, body = answer(raw)
    assert (status, body["field"]) == (408, "body"), body
    assert headers["Connection"] == "close"
    assert await data_keys(redis_client) == []


async def test_a_connection_over_the_cap_gets_503_while_every_slot_is_busy(
    make_config: MakeConfig, spawn: Spawn, connect: Connect
) -> None:
    """When api.max_connections connections each have a request in progress, a new one is
    answered 503 with Retry-After and a JSON error and closed; once a slot frees, requests go
    through again."""
    path, _ = make_config({"api": {"max_connections": 5, "body_timeout_seconds": 60}})
    api = await start_api(spawn, path)
    port = int(api.rsplit(":", 1)[1])
    head = (
        b"POST /download HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    busy = [await connect(port, head) for _ in range(5)]
    for reader, _w in busy:  # each request is being handled: its body is awaited
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    reader, writer = await connect(port, b"GET /hb HTTP/1.1\r\nHost: api\r\n\r\n")
    raw = await closed(reader, 10)
    assert raw is not None, "the refused connection stayed open"
    status, headers, body = answer(raw)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert "api.max_connections" in body["error"]
    writer.close()

    busy[0][1].close()
    async with asyncio.timeout(10):
        while True:
            try:
                await healthy(api)
                break
            except (AssertionError, aiohttp.ClientError):
                await asyncio.sleep(0.05)


def test_api_raises_its_open_file_limit_or_refuses_to_start(
    make_config: MakeConfig, cli: Cli, tmp_path: Path
) -> None:
    """An api whose soft open-file limit is below what api.max_connections needs raises it up to
    the hard limit; when the hard limit is too low as well, it exits 2 naming the key."""
    path, config = make_config()
    needed = 2 * config.api.max_connections + 1024

    def limit(soft: int, hard: int) -> Callable[[], None]:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = cli("api", "--port", str(free_port()), "-c", str(path), preexec_fn=limit(512, 512))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "api.max_connections" in err, err

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= needed, "this machine's hard limit is too low for the test"
    port = free_port()
    proc = cli("api", "--port", str(port), "-c", str(path), preexec_fn=limit(512, hard))
    try:
        asyncio.run(wait_http(f"http://127.0.0.1:{port}/hb"))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft_now = next(line for line in limits.splitlines() if "open files" in line).split()[3]
        assert int(soft_now) == needed
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# -- metrics ports (finding 15) -------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if int(local_port, 16) == port and state == "0A":
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.parametrize("role", ["processor", "notifier"])
@pytest.mark.parametrize("host", [None, "127.0.0.2"])
async def test_metrics_listen_on_loopback_unless_told_otherwise(
    make_config: MakeConfig, spawn: Spawn, role: str, host: str | None
) -> None:
    """A standalone processor's or notifier's metrics port listens on 127.0.0.1 only by
    default (127.0.0.2 gets no answer), and on `<role>.metrics_host` when it is set."""
    port = free_port()
    section: dict[str, Any] = {"metrics_port": port}
    if host is not None:
        section["metrics_host"] = host
    path, _ = make_config({role: section})
    spawn(role, path)
    expected = host or "127.0.0.1"
    await wait_http(f"http://{expected}:{port}/metrics")
    assert listening_addresses(port) == {expected}
    other = "127.0.0.2" if expected == "127.0.0.1" else "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, port), timeout=5).close()
