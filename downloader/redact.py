"""Secrets out of what the service shows: errors, logs, projections, exports."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["url_without_password"]


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
