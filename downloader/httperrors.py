"""Why an outgoing HTTP request failed, as a sentence for people: it goes into callbacks, job
projections and logs. `Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed
('127.0.0.1', 9)]` reads `could not connect to 127.0.0.1:9 (connection refused)`."""

from __future__ import annotations

import errno
import socket

import aiohttp

__all__ = ["describe"]

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host is down",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EPIPE: "connection closed",
}


def _reason(exc: OSError | None) -> str:
    if exc is None:
        return "unknown reason"
    if isinstance(exc, socket.gaierror):
        return "name not known"
    if exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _where(host: str | None, port: int | None) -> str:
    host = host or "?"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def describe(exc: BaseException) -> str:
    """A short sentence saying why a request failed (connection, DNS, proxy, server)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"could not resolve host {exc.host}"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return (
            f"could not connect to the proxy {_where(exc.host, exc.port)} ({_reason(exc.os_error)})"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {_where(exc.host, exc.port)} ({_reason(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy refused the request ({exc.status} {exc.message})".rstrip()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection error ({_reason(exc)})"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad response ({exc.status} {exc.message})".rstrip()
    if isinstance(exc, OSError):
        return f"connection error ({_reason(exc)})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
