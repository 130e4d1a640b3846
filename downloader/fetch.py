"""One download: stream a URL to a temporary file and verify it. The caller moves the file into
the store on success; on any failure (or cancellation) `fetch` has already removed it, and a
download that failed before its body never created one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import imagesize

from downloader.errors import PermanentError, TransientError
from downloader.httperrors import describe
from downloader.mime import SNIFF_BYTES, MimePattern, sniff
from downloader.netguard import find_blocked

__all__ = ["IMAGE_TYPES", "FetchRequest", "FetchResult", "fetch"]

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
class FetchResult:
    response_code: int
    mime_type: str
    size: int
    image_size: str


async def fetch(session: aiohttp.ClientSession, req: FetchRequest, dest: Path) -> FetchResult:
    """Download `req.url` into `dest` (a temporary path; the caller moves it into the store).

    Raises TransientError (worth retrying) or PermanentError, each with the response code."""
    timeout = aiohttp.ClientTimeout(total=req.timeout_s, sock_connect=req.connect_timeout_s)
    code = 0
    try:
        async with session.get(
            req.url, headers=req.headers, proxy=req.proxy, timeout=timeout
        ) as resp:
            code = resp.status
            if code >= 500:
                raise TransientError(f"Received status code {code}", code)
            if code >= 400 or code < 200:
                raise PermanentError(f"Received status code {code}", code)
            if resp.content_length is not None and resp.content_length > req.max_bytes:
                raise PermanentError(
                    f"The body is {resp.content_length} bytes, over the limit of {req.max_bytes}",
                    code,
                )
            mime_type, size = await _stream(resp, req, dest)
            image_size = await _image_size(req, mime_type, dest, code)
    except (TransientError, PermanentError):
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        host = urlsplit(req.proxy or req.url).netloc.rpartition("@")[2]
        raise TransientError(
            f"could not connect to {host} (no answer within {req.connect_timeout_s:g} s)", code
        ) from exc
    except TimeoutError as exc:
        raise TransientError(f"Download timed out after {req.timeout_s:g} s", code) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise PermanentError(f"TLS certificate error: {exc.certificate_error}", code) from exc
    except aiohttp.ClientSSLError as exc:
        raise PermanentError(f"TLS error: {exc}", code) from exc
    except aiohttp.ClientPayloadError as exc:
        raise TransientError(f"The body ended early: {exc}", code) from exc
    except aiohttp.TooManyRedirects as exc:
        raise PermanentError("Too many redirects", code) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlRedirectClientError) as exc:
        raise PermanentError(f"Invalid URL: {exc}", code) from exc
    except (aiohttp.ClientError, OSError) as exc:
        if blocked := find_blocked(exc):
            raise PermanentError(str(blocked), code) from exc
        if isinstance(exc, ssl.SSLError):
            raise PermanentError(f"TLS error: {exc}", code) from exc
        raise TransientError(describe(exc), code) from exc

    return FetchResult(code, mime_type, size, image_size)


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


async def _stream(resp: aiohttp.ClientResponse, req: FetchRequest, dest: Path) -> tuple[str, int]:
    """Write the body to `dest`; sniff the first bytes and fail fast on a mime mismatch."""
    small = resp.content_length is not None and resp.content_length <= _SMALL_BODY
    if small and resp.headers.get("Content-Encoding", "identity") == "identity":
        # Exactly Content-Length bytes (aiohttp fails a shorter body); a compressed body goes
        # the streaming way, where max_bytes counts what it inflates to.
        body = await resp.read()
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
