"""Secrets out of what the service shows: errors, logs, projections, exports."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ALWAYS_SECRET_HEADERS", "is_secret_header", "url_without_password"]

ALWAYS_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


def is_secret_header(name: str, configured: Iterable[str] = ()) -> bool:
    """Whether request header `name` carries a secret (case-insensitive): the four that always
    do, and those configured in `security.secret_headers`."""
    lowered = name.lower()
    return lowered in ALWAYS_SECRET_HEADERS or lowered in {c.lower() for c in configured}


def url_without_password(url: str) -> str:
    """`url` with the password of its userinfo replaced by `***` (the user name stays, so an
    operator can still tell which credentials were meant)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    netloc = f"{parts.username}:***@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))
