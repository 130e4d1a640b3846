"""One download: stream a URL to a temporary file and verify it. The caller moves the file into
the store on success; on any failure (or cancellation) `fetch` has already removed it, and a
download that failed before its body never created one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import imagesize
from yarl import URL

from downloader.config import Config
from downloader.errors import PermanentError, TransientError
from downloader.httperrors import describe
from downloader.mime import SNIFF_BYTES, MimePattern, sniff
from downloader.netguard import NetworkPolicy, find_blocked
from downloader.redact import is_secret_header

__all__ = ["IMAGE_TYPES", "MAX_REDIRECTS", "Egress", "FetchRequest", "FetchResult", "fetch"]

IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
    }
)
_CHUNK = 256 * 1024
_SMALL_BODY = 256 * 1024  # read whole, then kept in one worker-thread call (see _keep_small)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
"""Redirects one download follows; the next one fails it ("Too many redirects")."""


@dataclass(frozen=True)
class FetchRequest:
    url: str
    headers: dict[str, str]
    proxy: str | None
    timeout_s: float
    connect_timeout_s: float
    max_bytes: int
    mime: MimePattern | None
    extract_image_size: bool


@dataclass(frozen=True)
class Egress:
    """How a processor's downloads go out, the same for all its jobs."""

    policy: NetworkPolicy
    secret_headers: tuple[str, ...] = ()
    allow_https_downgrade: bool = False
    read_idle_timeout_s: float = 30.0
    min_bytes_per_second: int = 0
    min_throughput_window_s: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> Egress:
        return cls(
            policy=NetworkPolicy.from_config(config.security),
            secret_headers=tuple(config.security.secret_headers),
            allow_https_downgrade=config.security.allow_https_downgrade,
            read_idle_timeout_s=config.processor.read_idle_timeout_seconds,
            min_bytes_per_second=config.processor.min_bytes_per_second,
            min_throughput_window_s=config.processor.min_throughput_window_seconds,
        )


@dataclass(frozen=True)
class FetchResult:
    response_code: int
    mime_type: str
    size: int
    image_size: str


class _Progress:
    """One download so far: the status of its final response, and the minimum-throughput rule
    (once the window has passed, the body bytes must average at least min_bytes_per_second
    since the first request; a response still awaited then has sent 0 bytes)."""

    def __init__(self, egress: Egress) -> None:
        self.code = 0
        self.body_bytes = 0
        self.min_bps = egress.min_bytes_per_second
        self.started = asyncio.get_running_loop().time()
        self.window_end = self.started + egress.min_throughput_window_s if self.min_bps else None

    def add(self, n: int) -> None:
        """Count `n` more body bytes; raise TransientError once the download is too slow."""
        self.body_bytes += n
        if self.window_end is None:
            return
        now = asyncio.get_running_loop().time()
        if now >= self.window_end and self.body_bytes < self.min_bps * (now - self.started):
            raise self.too_slow()

    def too_slow(self) -> TransientError:
        elapsed = asyncio.get_running_loop().time() - self.started
        return TransientError(
            f"the origin sent {self.body_bytes} bytes in {elapsed:.3g} s, below the minimum "
            f"of {self.min_bps} B/s",
            self.code,
        )


async def fetch(
    session: aiohttp.ClientSession, req: FetchRequest, dest: Path, egress: Egress
) -> FetchResult:
    """Download `req.url` into `dest` (a temporary path; the caller moves it into the store).

    Raises TransientError (worth retrying) or PermanentError, each with the response code."""
    progress = _Progress(egress)
    try:
        async with asyncio.timeout(req.timeout_s):  # the whole download, over all its hops
            async with await _open(session, req, egress, progress) as resp:
                code = resp.status
                if code >= 500:
                    raise TransientError(f"Received status code {code}", code)
                if code >= 400 or code < 200:
                    raise PermanentError(f"Received status code {code}", code)
                if resp.content_length is not None and resp.content_length > req.max_bytes:
                    raise PermanentError(
                        f"The body is {resp.content_length} bytes, over the limit of "
                        f"{req.max_bytes}",
                        code,
                    )
                mime_type, size = await _stream(resp, req, dest, progress)
                image_size = await _image_size(req, mime_type, dest, code)
    except (TransientError, PermanentError):
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        host = urlsplit(req.proxy or req.url).netloc.rpartition("@")[2]
        raise TransientError(
            f"could not connect to {host} (no answer within {req.connect_timeout_s:g} s)",
            progress.code,
        ) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise TransientError(
            f"the origin sent nothing for {egress.read_idle_timeout_s:g} s", progress.code
        ) from exc
    except TimeoutError as exc:
        raise TransientError(
            f"Download timed out after {req.timeout_s:g} s", progress.code
        ) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise PermanentError(
            f"TLS certificate error: {exc.certificate_error}", progress.code
        ) from exc
    except aiohttp.ClientSSLError as exc:
        raise PermanentError(f"TLS error: {exc}", progress.code) from exc
    except aiohttp.ClientPayloadError as exc:
        raise TransientError(f"The body ended early: {exc}", progress.code) from exc
    except aiohttp.InvalidURL as exc:
        raise PermanentError(f"Invalid URL: {exc}", progress.code) from exc
    except (aiohttp.ClientError, OSError) as exc:
        if blocked := find_blocked(exc):
            raise PermanentError(str(blocked), progress.code) from exc
        if isinstance(exc, ssl.SSLError):
            raise PermanentError(f"TLS error: {exc}", progress.code) from exc
        raise TransientError(describe(exc), progress.code) from exc

    return FetchResult(code, mime_type, size, image_size)


async def _open(
    session: aiohttp.ClientSession, req: FetchRequest, egress: Egress, progress: _Progress
) -> aiohttp.ClientResponse:
    """The final response for `req.url`, its body not read yet: redirects are followed here,
    not by aiohttp, so that each hop is checked (a proxied target against the network policy,
    https to http refused) and a hop to another origin leaves the secret headers behind."""
    try:
        url = URL(req.url)
    except ValueError as exc:
        raise PermanentError("Invalid URL: not a URL") from exc
    headers = dict(req.headers)
    timeout = aiohttp.ClientTimeout(
        sock_connect=req.connect_timeout_s, sock_read=egress.read_idle_timeout_s
    )
    redirects = 0
    while True:
        if req.proxy is not None:
            await _check_proxied(egress.policy, url)
        try:
            resp = await _within_window(
                progress,
                session.get(
                    url, headers=headers, proxy=req.proxy, timeout=timeout, allow_redirects=False
                ),
            )
        except aiohttp.InvalidURL:
            raise
        except ValueError as exc:  # what aiohttp cannot send (e.g. a redirect's credentials)
            raise PermanentError(f"Invalid request to {url.host}: {exc}") from exc
        location = resp.headers.get("Location")
        if resp.status not in _REDIRECTS or location is None:
            progress.code = resp.status
            return resp
        resp.release()  # its body is not wanted; aiohttp closes the connection if unread
        redirects += 1
        if redirects > MAX_REDIRECTS:
            raise PermanentError("Too many redirects")
        # every hop is a GET: the body-less GET we started with stays one for 301/302/303,
        # and 307/308 keep the method
        target = _redirect_target(url, location)
        if url.scheme == "https" and target.scheme == "http" and not egress.allow_https_downgrade:
            raise PermanentError(
                f"refused to follow a redirect from https to http ({target.host}): "
                "security.allow_https_downgrade is false"
            )
        if _origin(target) != _origin(url):
            headers = {
                k: v for k, v in headers.items() if not is_secret_header(k, egress.secret_headers)
            }
        elif target.user is not None:  # the new userinfo is the credentials from now on
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = target


def _redirect_target(url: URL, location: str) -> URL:
    """`location` resolved against the URL that answered with it; only http(s) is followed."""
    try:
        target = url.join(URL(location))
    except ValueError as exc:
        raise PermanentError("Invalid URL: a redirect to a location that is not a URL") from exc
    if target.scheme not in ("http", "https"):
        raise PermanentError(f"Invalid URL: a redirect to a {target.scheme or 'schemeless'} URL")
    if not target.raw_host:
        raise PermanentError("Invalid URL: a redirect to a URL without a host")
    return target


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port


async def _check_proxied(policy: NetworkPolicy, url: URL) -> None:
    """The proxy dials the target, not us: check the target first (see netguard.py)."""
    host = url.raw_host or ""
    try:
        await policy.check_target(host, url.port or 0)
    except socket.gaierror as exc:
        raise TransientError(f"could not resolve host {host}") from exc
    except UnicodeError as exc:  # an empty or over-long label: no resolver takes it
        raise PermanentError(f"Invalid URL: bad host {host!r}") from exc


async def _within_window(
    progress: _Progress, request: Awaitable[aiohttp.ClientResponse]
) -> aiohttp.ClientResponse:
    """Await a response, at most until the minimum-throughput window ends."""
    if progress.window_end is None:
        return await request
    window = asyncio.timeout_at(progress.window_end)
    try:
        async with window:
            return await request
    except TimeoutError as exc:
        if window.expired():
            raise progress.too_slow() from exc
        raise


async def _image_size(req: FetchRequest, mime_type: str, dest: Path, code: int) -> str:
    if not (req.extract_image_size and mime_type in IMAGE_TYPES):
        return ""
    try:
        width, height = await asyncio.to_thread(imagesize.get, str(dest))
        if width <= 0 or height <= 0:
            raise PermanentError(f"Bad image: cannot read the size of this {mime_type}", code)
    except BaseException:
        _remove(dest)
        raise
    return f"{width}x{height}"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_when_done(path: Path) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback removing `path` once a worker thread that may write it has finished."""

    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: its error no longer matters
        _remove(path)

    return done


async def _stream(
    resp: aiohttp.ClientResponse, req: FetchRequest, dest: Path, progress: _Progress
) -> tuple[str, int]:
    """Write the body to `dest`; sniff the first bytes and fail fast on a mime mismatch."""
    small = resp.content_length is not None and resp.content_length <= _SMALL_BODY
    if small and resp.headers.get("Content-Encoding", "identity") == "identity":
        # Exactly Content-Length bytes (aiohttp fails a shorter body); a compressed body goes
        # the streaming way, where max_bytes counts what it inflates to.
        parts = []
        async for part in resp.content.iter_chunked(_CHUNK):
            progress.add(len(part))
            parts.append(part)
        body = b"".join(parts)
        loop = asyncio.get_running_loop()
        kept = loop.run_in_executor(None, _keep_small, body, req.mime, resp.status, dest)
        try:
            return await asyncio.shield(kept), len(body)
        except asyncio.CancelledError:  # the thread runs on and may yet write the file
            kept.add_done_callback(_remove_when_done(dest))
            raise
    size = 0
    head = bytearray()
    mime_type: str | None = None
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        async for chunk in resp.content.iter_chunked(_CHUNK):
            progress.add(len(chunk))
            size += len(chunk)
            if size > req.max_bytes:
                raise PermanentError(
                    f"The body is over the limit of {req.max_bytes} bytes", resp.status
                )
            if mime_type is None:
                head += chunk
                if len(head) >= SNIFF_BYTES:
                    mime_type = await _check_mime(bytes(head), req.mime, resp.status)
            _write_all(fd, chunk)
        os.close(fd)
        fd = -1
        if mime_type is None:
            mime_type = await _check_mime(bytes(head), req.mime, resp.status)
    except BaseException:  # the file is ours until we return: leave nothing behind
        if fd >= 0:
            os.close(fd)
        _remove(dest)
        raise
    return mime_type, size


def _keep_small(body: bytes, pattern: MimePattern | None, code: int, dest: Path) -> str:
    """A small body, whole: sniff it and, if its type passes, write it to `dest`. One worker-
    thread call does all the blocking work (libmagic, creating and writing the file), so the
    event loop never waits on the filesystem for the common case."""
    mime_type = _verify_mime(sniff(body[:SNIFF_BYTES]), pattern, code)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, body)
    except BaseException:
        os.close(fd)
        _remove(dest)
        raise
    os.close(fd)
    return mime_type


def _write_all(fd: int, data: bytes) -> None:
    """Write `data` whole. Writes land in the page cache, so the streaming path makes them on
    the loop: a thread hop per chunk would cost more than it saves."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _check_mime(head: bytes, pattern: MimePattern | None, code: int) -> str:
    return _verify_mime(await asyncio.to_thread(sniff, head), pattern, code)


def _verify_mime(mime_type: str, pattern: MimePattern | None, code: int) -> str:
    if pattern is not None and not pattern.matches(mime_type):
        raise PermanentError(
            f"Expected mime-type to be ({pattern.text}), found ({mime_type})", code
        )
    return mime_type
