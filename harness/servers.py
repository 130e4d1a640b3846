"""Real HTTP peers on 127.0.0.1 for the tests: an origin file server, a callback receiver and a
forward proxy. Each records what it saw so tests can assert on it and await it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from harness.net import free_port, wait_http

__all__ = [
    "CallbackReceiver",
    "FileServer",
    "ForwardProxy",
    "LoggingProxy",
    "Reply",
    "TcpRelay",
    "free_port",
    "job_request",
    "until",
    "valid_body",
    "wait_http",
]


def valid_body(**fields: Any) -> dict[str, Any]:
    """A POST /download body the API accepts, nothing listening at its URLs (for api-only
    tests), with `fields` on top."""
    base = job_request("http://origin.test/a.png", "http://receiver.test/cb", aggr_id="a1")
    return {**base, "aggr_limit": 2, **fields}


def job_request(url: str, callback: str, **fields: Any) -> dict[str, Any]:
    """A POST /download body with an HTTP callback; `fields` add to or override the defaults."""
    return {
        "aggr_id": "t",
        "aggr_limit": 4,
        "url": url,
        "callback_type": "http",
        "callback_dst": callback,
        **fields,
    }


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """A bounded poll, for a state reached elsewhere (another OS process, a server's counter)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.02)


@dataclass
class Reply:
    """One scripted answer of the file server."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    truncate_to: int | None = None  # announce len(body), send only this many bytes, then close
    stall_after: int | None = None  # send this many bytes, then hang


class _Server:
    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _start(self, app: web.Application) -> None:
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.2
        )
        await self.runner.setup()
        # port 0: the kernel's choice, bound at once (a free_port() then a bind can lose the
        # port to another suite's server in between)
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class FileServer(_Server):
    """Serves scripted replies per path: a list is answered in order, its last item repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: dict[str, list[Reply]] = {}
        self.requests: dict[str, list[dict[str, str]]] = defaultdict(list)

    async def start(self) -> FileServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self._start(app)
        return self

    def add(self, path: str, *replies: Reply | bytes) -> str:
        self.replies[path] = [r if isinstance(r, Reply) else Reply(r) for r in replies]
        self.requests.pop(path, None)
        return self.url(path)

    def count(self, path: str) -> int:
        return len(self.requests[path])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path].append(dict(request.headers))
        script = self.replies.get(path)
        if not script:
            return web.Response(status=404, text="not found")
        n = len(self.requests[path])
        reply = script[min(n, len(script)) - 1]
        if reply.truncate_to is None and reply.stall_after is None:
            return web.Response(body=reply.body, status=reply.status, headers=reply.headers)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        resp.content_length = len(reply.body)
        await resp.prepare(request)
        cut = reply.truncate_to if reply.truncate_to is not None else reply.stall_after
        await resp.write(reply.body[:cut])
        if reply.stall_after is not None:
            await asyncio.sleep(3600)
        assert request.transport is not None
        request.transport.close()
        return resp


class CallbackReceiver(_Server):
    """Collects callbacks; `status` scripts the answers (list in order, last repeats)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = [200]
        self.delay_s = 0.0
        self._arrived = asyncio.Condition()

    async def start(self) -> CallbackReceiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        await self._start(app)
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        n = sum(1 for p in self.received if p.get("job_id") == payload.get("job_id"))
        status = self.statuses[min(n, len(self.statuses) - 1)]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        async with self._arrived:
            self.received.append({**payload, "_status": status})
            self.headers.append(dict(request.headers))
            self._arrived.notify_all()
        return web.Response(status=status)

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return [p for p in self.received if p["job_id"] == job_id]

    async def wait_for(
        self, job_id: str, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """The first `count` callbacks of a job, once they arrived."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.for_job(job_id)) >= count)
        return self.for_job(job_id)

    async def wait_total(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)


class HoldingReceiver(_Server):
    """A callback receiver that holds the first callback of each job until `release` (its
    payload in `first`), and answers 200 at once to every later one (those count as delivered,
    at `delivered_at`: time.monotonic() of the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.held: Counter[str] = Counter()
        self.first: dict[str, dict[str, Any]] = {}
        self.delivered: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.delivered_at: dict[str, float] = {}
        self._changed = asyncio.Condition()

    async def start(self) -> HoldingReceiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        await self._start(app)
        return self

    async def close(self) -> None:
        self.release.set()
        await super().close()

    async def wait(self, predicate: Callable[[], bool], timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    async def _handle(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        job_id = payload["job_id"]
        async with self._changed:
            first = job_id not in self.held
            if first:
                self.held[job_id] += 1
                self.first[job_id] = payload
            else:
                self.delivered[job_id].append(payload)
                self.delivered_at.setdefault(job_id, time.monotonic())
            self._changed.notify_all()
        if first:
            await self.release.wait()
        return web.Response(status=200)


class ForwardProxy(_Server):
    """A plain HTTP forward proxy (absolute-form requests), recording what went through it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    async def start(self) -> ForwardProxy:

        self.client = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self._start(app)
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        target = str(request.url)
        self.seen.append(target)
        async with self.client.get(target, headers={"X-Via-Proxy": "1"}) as resp:
            return web.Response(body=await resp.read(), status=resp.status)

    async def close(self) -> None:
        await self.client.close()
        await super().close()


class LoggingProxy:
    """A forward proxy on `host` that speaks both absolute-form requests (plain http) and
    CONNECT (https), and logs the request line of each in `seen` ("GET http://h:p/x",
    "CONNECT h:443") before doing anything else. It dials loopback targets only and answers
    502 at once for others, so a request that should never have come cannot hang a test; one
    request per connection (it tells the origin `Connection: close`)."""

    _HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "proxy-authorization"})

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.seen: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> LoggingProxy:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ", 2)
            self.seen.append(f"{method} {target}")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                first = ""
            else:
                url = urlsplit(target)
                host, port = url.hostname or "", str(url.port or 80)
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                kept = [
                    f for f in fields if f and f.split(":", 1)[0].lower() not in self._HOP_BY_HOP
                ]
                first = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close"])
                first += "\r\n\r\n"
            await self._relay(reader, writer, host.strip("[]"), int(port), first)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        first: str,
    ) -> None:
        if not _loopback(host):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        self._writers.add(up_writer)
        try:
            if first:
                up_writer.write(first.encode("latin-1"))
            else:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


_REQUEST_LINE = re.compile(rb"(?:GET|HEAD|PUT|POST|DELETE) /\S* HTTP/1\.1")


class TcpRelay:
    """Forwards connections from its own loopback port to `target_port`. `stop()` makes that port
    refuse connections and drops the open ones, as a server that went down; `start()` brings it
    back on the same port (for peers whose state must outlive the outage, e.g. moto's).
    `hold()` keeps connections open but forwards nothing until `release()`, as a stalled peer;
    `received` counts the bytes clients sent, `requests` the HTTP request lines among them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.received = 0
        self.requests: list[str] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, upstream=True), self._pipe(up_reader, writer)
            )
        finally:
            self._writers -= pair

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.received += len(data)
                    self.requests += [m.decode() for m in _REQUEST_LINE.findall(data)]
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
