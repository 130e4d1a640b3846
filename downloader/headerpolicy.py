"""Which request headers a caller (`request_headers`) or the configuration
(`processor.request_headers`) may have the processor send to an origin."""

from __future__ import annotations

import re

__all__ = ["HEADER_NAME", "forbidden_header", "header_problem"]

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
"""An HTTP field name: one RFC 9110 token."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a tab is allowed in a value

_FRAMING = "it frames the request"
_HOP = "it is hop-by-hop: it concerns one connection, not the request"
_FORBIDDEN = {
    # The HTTP client frames the request and manages its connections; a caller's value here
    # desynchronises a keep-alive connection shared with other jobs (request smuggling).
    "content-length": _FRAMING,
    "transfer-encoding": _FRAMING,
    "connection": _HOP,
    "keep-alive": _HOP,
    "proxy-connection": _HOP,
    "te": _HOP,
    "trailer": _HOP,
    "upgrade": _HOP,
    "expect": "it changes how the request is sent",
    "host": "the host comes from url",
    "proxy-authorization": (
        "the proxy's credentials go in aggr_proxy, as http://user:password@proxy:port"
    ),
}


def forbidden_header(name: str) -> str | None:
    """Why header `name` may not be set (case-insensitive), as a sentence; None if it may."""
    reason = _FORBIDDEN.get(name.lower())
    return f"{name} may not be set ({reason})" if reason else None


def header_problem(name: str, value: str) -> str | None:
    """What is wrong with sending `name: value` to an origin, or None."""
    if not HEADER_NAME.match(name):
        return f"{name!r} is not a valid header name"
    if _CONTROL.search(value):
        return f"the value of {name} has control characters"
    return forbidden_header(name)
