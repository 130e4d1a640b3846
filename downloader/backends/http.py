"""HTTP callbacks: POST the JSON payload with one shared session; any 2xx is delivered."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from downloader.backends import Delivery, Payload
from downloader.httperrors import describe
from downloader.netguard import NetworkPolicy, find_blocked

__all__ = ["HttpBackend"]


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
            connector=connector, timeout=self.timeout, trust_env=False
        )

    async def deliver(
        self, job_id: str, event_id: str, destination: str, payload: Payload, tenant: str = ""
    ) -> Delivery:
        assert self.session is not None, "start() first"
        body = json.dumps(payload, separators=(",", ":"))
        headers = {"Content-Type": "application/json", "User-Agent": "downloader"}
        signer = self.tenant_signers.get(tenant, self.signer)
        if signer is not None:
            # Standard Webhooks: the id stays the same across retries of one callback.
            now = datetime.now(tz=UTC)
            headers["webhook-id"] = job_id
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = signer.sign(job_id, now, body)
        try:
            async with self.session.post(destination, data=body, headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return Delivery(True)
                return Delivery(False, f"Received status code {resp.status}")
        except TimeoutError:
            return Delivery(False, f"No answer within {self.timeout.total:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            if blocked := find_blocked(exc):
                return Delivery(False, str(blocked))
            return Delivery(False, describe(exc))

    async def close(self, timeout_s: float) -> None:
        if self.session is not None:
            await self.session.close()
