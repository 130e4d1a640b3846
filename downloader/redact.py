"""Secrets out of what the service shows: projections, events (and so the Kafka export), error
sentences, logs.

A job's secrets are the password of its URL's userinfo, the values of its URL's secret query
parameters (`security.secret_query_params`), the values of its secret request headers
(Authorization, Proxy-Authorization, Cookie, Set-Cookie and `security.secret_headers`), the same
in its HTTP callback URL, and the password of its aggregation's proxy. What is shown holds `***`
in their place; the real values are sealed away for the processor and the notifier only (see
`seal`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from downloader.config import SecurityConfig

__all__ = [
    "ALWAYS_SECRET_HEADERS",
    "MASK",
    "is_secret_header",
    "redact_url",
    "scrub",
    "seal",
    "secrets_of",
    "url_without_password",
]

MASK = "***"
ALWAYS_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


def is_secret_header(name: str, configured: Iterable[str] = ()) -> bool:
    """Whether request header `name` carries a secret (case-insensitive): the four that always
    do, and those configured in `security.secret_headers` (lowercased by the config)."""
    lowered = name.lower()
    return lowered in ALWAYS_SECRET_HEADERS or lowered in configured


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
    netloc = f"{parts.username}:{MASK}@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _secret_params(query: str, names: Iterable[str]) -> list[tuple[int, str]]:
    """(index in the &-split query, raw value) of each secret parameter."""
    wanted = {n.lower() for n in names}
    found = []
    for i, part in enumerate(query.split("&")):
        name, eq, value = part.partition("=")
        if eq and value and unquote_plus(name).lower() in wanted:
            found.append((i, value))
    return found


def redact_url(url: str, secret_params: Iterable[str]) -> str:
    """`url` with its userinfo password and the values of its secret query parameters masked;
    everything else kept as it was written."""
    shown = url_without_password(url)
    parts = urlsplit(shown)
    secret = _secret_params(parts.query, secret_params)
    if not secret:
        return shown
    pieces = parts.query.split("&")
    for i, _value in secret:
        pieces[i] = pieces[i].partition("=")[0] + "=" + MASK
    return urlunsplit(parts._replace(query="&".join(pieces)))


def secrets_of(
    urls: Iterable[str], headers: Mapping[str, str], security: SecurityConfig
) -> list[str]:
    """The secret strings of a job (as written and as decoded), to scrub from error sentences."""
    found: set[str] = set()
    for url in urls:
        if not url:
            continue
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        if parts.password:
            found.update({parts.password, unquote(parts.password)})
        for _i, value in _secret_params(parts.query, security.secret_query_params):
            found.update({value, unquote_plus(value), quote(unquote_plus(value), safe="")})
    for name, value in headers.items():
        if is_secret_header(name, security.secret_headers) and value:
            found.add(value)
            scheme_and_token = value.split(None, 1)  # "Bearer <token>": the token alone too
            if len(scheme_and_token) == 2:
                found.add(scheme_and_token[1])
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret in it masked (longest first)."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def seal(
    fields: Mapping[str, Any], security: SecurityConfig
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a job's request into what is shown (secrets masked) and the sealed real values:
    {"url" | "request_headers" | "callback_dst": the real value (headers as JSON)}, only those
    that differ. The aggregation's real proxy is kept apart by the caller."""
    public = dict(fields)
    sealed: dict[str, str] = {}
    params = security.secret_query_params
    for name in ("url", "callback_dst"):
        value = str(fields.get(name) or "")
        if value.startswith(("http://", "https://")):
            shown = redact_url(value, params)
            if shown != value:
                public[name], sealed[name] = shown, value
    headers: dict[str, str] = dict(fields.get("request_headers") or {})
    shown_headers = {
        k: (MASK if is_secret_header(k, security.secret_headers) else v) for k, v in headers.items()
    }
    if shown_headers != headers:
        public["request_headers"] = shown_headers
        sealed["request_headers"] = json.dumps(headers, separators=(",", ":"))
    if fields.get("aggr_proxy"):
        public["aggr_proxy"] = url_without_password(str(fields["aggr_proxy"]))
    return public, sealed
