"""HTTP callbacks: POST the JSON payload with one shared session; any 2xx is delivered.

The status decides: a 2xx is delivered as soon as its headers are in (as the original did; the
body is not waited for). Of a non-2xx answer at most ANSWER_READ_BYTES are read, for a short
printable excerpt that ends the delivery error. Nothing is ever decompressed, so a huge or
compressed answer cannot grow the notifier, and a connection whose answer was not read to its
end is closed, never put back in the pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from downloader.backends import Delivery, Payload
from downloader.httperrors import describe
from downloader.netguard import NetworkPolicy, find_blocked

__all__ = ["ANSWER_READ_BYTES", "EXCERPT_CHARS", "EXCERPT_WAIT_S", "HttpBackend", "answer_excerpt"]

ANSWER_READ_BYTES = 4096
"""The most of a receiver's answer read: enough for an error message, a page at most."""
EXCERPT_CHARS = 200
"""The most of a non-2xx answer quoted in `delivery_error`."""
EXCERPT_WAIT_S = 2.0
"""How long a non-2xx answer's body is waited for: its status is known, the excerpt is a bonus."""
_BLANKS = re.compile(r"\s+")


def answer_excerpt(head: bytes, content_encoding: str = "") -> str:
    """The start of an answer as one printable line of at most EXCERPT_CHARS characters: text
    decoded as UTF-8, every control, format or separator character (CR, LF, ESC, bidi
    overrides...) a space, blanks collapsed. A compressed answer is not quoted: ''."""
    if content_encoding.strip().lower() not in ("", "identity"):
        return ""
    text = head.decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text)
    text = _BLANKS.sub(" ", text).strip()
    if len(text) > EXCERPT_CHARS:
        text = text[: EXCERPT_CHARS - 3].rstrip() + "..."
    return text


async def _read_head(resp: aiohttp.ClientResponse, limit: int, wait_s: float) -> bytes:
    """At most `limit` bytes of the answer's body (raw: never decompressed), as many as came
    within `wait_s` seconds or the request's own timeout."""
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
        async with asyncio.timeout(wait_s):
            while size < limit:
                chunk = await resp.content.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    return b"".join(chunks)


class HttpBackend:
    name = "http"

    def __init__(
        self,
        timeout_s: float,
        policy: NetworkPolicy,
        signing_secret: str | None,
        limit: int,
        tenant_secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.policy = policy
        self.limit = limit
        self.signer = Webhook(signing_secret) if signing_secret else None
        # a tenant with a secret of its own signs with it: no tenant can have a callback signed
        # with another's secret sent to that other's receiver
        self.tenant_signers = {t: Webhook(s) for t, s in (tenant_secrets or {}).items()}
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.limit, socket_factory=self.policy.socket_factory()
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, trust_env=False, auto_decompress=False
        )

    async def deliver(
        self, job_id: str, event_id: str, destination: str, payload: Payload, tenant: str = ""
    ) -> Delivery:
        assert self.session is not None, "start() first"
        body = json.dumps(payload, separators=(",", ":"))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "downloader",
            "Accept-Encoding": "identity",  # we never decompress: do not ask for it
        }
        signer = self.tenant_signers.get(tenant, self.signer)
        if signer is not None:
            # Standard Webhooks: the id stays the same across retries of one callback.
            now = datetime.now(tz=UTC)
            headers["webhook-id"] = job_id
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = signer.sign(job_id, now, body)
        try:
            async with self.session.post(destination, data=body, headers=headers) as resp:
                delivered = 200 <= resp.status < 300
                head = (
                    b"" if delivered else await _read_head(resp, ANSWER_READ_BYTES, EXCERPT_WAIT_S)
                )
                if not resp.content.at_eof():
                    resp.close()  # the rest stays unread: drop the connection, not drain it
                if delivered:
                    return Delivery(True)
                error = f"Received status code {resp.status}"
                excerpt = answer_excerpt(head, resp.headers.get("Content-Encoding", ""))
                return Delivery(False, f"{error}: {excerpt}" if excerpt else error)
        except TimeoutError:
            return Delivery(False, f"No answer within {self.timeout.total:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            if blocked := find_blocked(exc):
                return Delivery(False, str(blocked))
            return Delivery(False, describe(exc))

    async def close(self, timeout_s: float) -> None:
        if self.session is not None:
            await self.session.close()
