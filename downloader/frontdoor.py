"""The API's front door: who may connect, for how long, and from which browser pages.

aiohttp's server closes idle keep-alive connections, but it gives a request head or body no
deadline of its own, and it accepts connections until the process runs out of file descriptors.
`FrontDoor` wraps the protocol of every connection aiohttp serves (`FrontDoor.serve`) and adds:

- a deadline for each request head (`api.header_timeout_seconds`, from the connection's start,
  or on a keep-alive connection from the first byte of the next request); a connection that
  misses it is closed;
- a deadline for a request body (`api.body_timeout_seconds`, in `read_body`): a late body gets
  `408` and its connection is closed;
- a cap on open connections (`api.max_connections`): at the cap a new connection closes the
  oldest one that has no request in progress (idle, or still sending its head), and when every
  connection is busy with a request it is answered `503` with `Retry-After` and closed.

`origin_middleware` refuses requests from browser pages of other sites (see the README, HTTP API).
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from downloader.config import ApiConfig
from downloader.errors import RequestRefused
from downloader.log import get_logger

__all__ = ["FrontDoor", "cors_headers", "origin_middleware"]

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REFUSAL_LINGER_S = 1.0
"""How long a refused connection may still send (and have it discarded) after our 503, so its
client reads the answer instead of a reset."""
MAX_LINGERING_REFUSALS = 100
"""Refused connections lingering at once; more are closed as soon as the 503 is written."""
CORS_MAX_AGE_S = 600
CORS_METHODS = "GET, POST, DELETE"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
CORS_EXPOSED = "Idempotent-Replayed, Retry-After"


class _State(enum.Enum):
    HEAD = "reading a request head"
    REQUEST = "a request in progress"
    IDLE = "idle between requests"


class FrontDoor:
    """Connection limits of one API server; `middleware` must be the app's first middleware."""

    def __init__(self, api: ApiConfig) -> None:
        self.header_timeout_s = api.header_timeout_seconds
        self.body_timeout_s = api.body_timeout_seconds
        self.keepalive_timeout_s = api.keepalive_timeout_seconds
        self.max_connections = api.max_connections
        self._conns: dict[asyncio.BaseTransport, _Connection] = {}
        self._waiting: dict[_Connection, None] = {}  # no request in progress; oldest first
        self._refusals: set[_Refusal] = set()
        self._listener: asyncio.Server | None = None
        self.middleware = self._make_middleware()

    async def serve(self, runner: web.AppRunner, host: str, port: int) -> int:
        """Listen on host:port for `runner`'s app (after `runner.setup()`); the bound port."""
        server = runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before serve()")
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self, server), host, port, reuse_address=True
        )
        bound: int = self._listener.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop listening and drop refused connections; aiohttp's runner closes the others."""
        if self._listener is not None:
            self._listener.close()
        for refusal in list(self._refusals):
            refusal.abort()

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, which must arrive within api.body_timeout_seconds; else 408 (and
        the connection is closed once that answer is written)."""
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except ConnectionResetError:  # the client went away: no one to answer, nothing to log
            raise RequestRefused("body", "the connection closed before the body arrived") from None
        except TimeoutError:
            conn = self._conns.get(request.transport) if request.transport else None
            if conn is not None:
                conn.close_after_response = True
            raise RequestRefused(
                "body",
                f"the body did not arrive within {self.body_timeout_s:g} s "
                "(api.body_timeout_seconds)",
                status=408,
            ) from None

    # -- what connections report -----------------------------------------------------------------

    def _admit(self, conn: _Connection) -> bool:
        """Whether a new connection may be served: below the cap, or once the oldest
        connection without a request in progress has been closed for it."""
        if len(self._conns) >= self.max_connections:
            if not self._waiting:
                return False
            next(iter(self._waiting)).shut("closed for a new connection at api.max_connections")
        assert conn.transport is not None
        self._conns[conn.transport] = conn
        self._waiting[conn] = None
        return True

    def _set_waiting(self, conn: _Connection, waiting: bool) -> None:
        """Whether `conn` has no request in progress (and so may be closed for a newcomer)."""
        if waiting:
            self._waiting[conn] = None
        else:
            self._waiting.pop(conn, None)

    def _gone(self, conn: _Connection) -> None:
        self._waiting.pop(conn, None)
        if conn.transport is not None:
            self._conns.pop(conn.transport, None)

    def _make_middleware(self) -> Middleware:
        @web.middleware
        async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            """Marks the connection busy while its request runs; closes it after a late body."""
            conn = self._conns.get(request.transport) if request.transport else None
            if conn is None:  # the app is served some other way (tests' plain TCPSite)
                return await handler(request)
            conn.request_started()
            try:
                response = await handler(request)
                if conn.close_after_response:
                    # the rest of the body may still trickle in: answer, then close at once
                    # rather than read it (aiohttp would, for up to 10 s)
                    response.force_close()
                    await response.prepare(request)
                    await response.write_eof()
                    conn.shut("the body was late")
                return response
            finally:
                conn.request_ended()

        return track_requests


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, with deadlines and a place under the
    cap. Every transport event is passed on unchanged."""

    def __init__(self, door: FrontDoor, server: web.Server) -> None:
        self.door = door
        self.server = server
        self.inner: asyncio.Protocol = _Refusal(door)  # until admitted
        self.transport: asyncio.Transport | None = None
        self.state = _State.HEAD
        self.deadline: asyncio.TimerHandle | None = None
        self.closing = False
        self.close_after_response = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.door._admit(self):
            self.inner = self.server()
            self._await_head()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state is _State.IDLE:  # the next request begins
            self.state = _State.HEAD
            self._await_head()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_deadline()
        self.door._gone(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- a request's life (told by FrontDoor.middleware) -----------------------------------------

    def request_started(self) -> None:
        self.state = _State.REQUEST
        self._cancel_deadline()
        self.door._set_waiting(self, False)

    def request_ended(self) -> None:
        if self.state is _State.REQUEST and not self.closing:
            self.state = _State.IDLE  # aiohttp's keep-alive timeout applies from here
            self.door._set_waiting(self, True)

    def shut(self, why: str) -> None:
        """Close this connection; it counts under the cap until it is gone."""
        self.closing = True
        self._cancel_deadline()
        self.door._set_waiting(self, False)
        if self.transport is not None and not self.transport.is_closing():
            log.debug("closing api connection", why=why, peer=self._peer())
            self.transport.close()

    def _await_head(self) -> None:
        self._cancel_deadline()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(self.door.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self.deadline = None
        if self.state is _State.HEAD:
            self.shut("no request head within api.header_timeout_seconds")

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, whatever it sends, then closed."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(_refusal_bytes(self.door.max_connections))
        if len(self.door._refusals) >= MAX_LINGERING_REFUSALS:
            transport.close()
            return
        self.door._refusals.add(self)
        transport.write_eof()  # the answer, then our end; what they still send is discarded
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self.abort)

    def data_received(self, data: bytes) -> None:
        pass  # a request we do not serve

    def eof_received(self) -> bool:
        return False  # they are done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.door._refusals.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _refusal_bytes(cap: int) -> bytes:
    body = (
        json.dumps({"error": f"too many connections (api.max_connections {cap}); retry shortly"})
        + "\n"
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


# -- browser pages ---------------------------------------------------------------------------------


def origin_middleware(allowed_origins: Iterable[str]) -> Middleware:
    """Refuse (403, naming `Origin`) a request whose `Origin` header is not one of
    `allowed_origins`, and answer CORS preflights for those that are. A request without
    `Origin` (curl, services, a page's own GETs) passes untouched."""
    allowed = frozenset(allowed_origins)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origins = request.headers.getall("Origin", [])
        if not origins:
            return await handler(request)
        if len(origins) > 1 or origins[0].lower() not in allowed:
            raise RequestRefused(
                "Origin",
                "requests from browser pages of other sites are refused: this page's Origin "
                "is not in api.allowed_origins",
                status=403,
            )
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
                },
            )
        return await handler(request)

    return check_origin


def cors_headers(
    allowed_origins: Iterable[str],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook: an answer to an allowed origin says so (CORS), so that
    origin's pages may read it; every answer varies by `Origin`."""
    allowed = frozenset(allowed_origins)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin", "").lower()
        if origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED

    return add
