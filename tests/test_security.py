"""Security features end to end: the network policy for downloads, redirects and callbacks,
signed callbacks (Standard Webhooks), and the download size limit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from harness.servers import CallbackReceiver, FileServer, Reply, job_request
from tests.conftest import Service

ServiceFactory = Callable[..., Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLOSED = {"security": {"allow_private_networks": False}}


def job_body(url: str, callback: str, **extra: Any) -> dict[str, Any]:
    return job_request(url, callback, **{"aggr_id": "sec", **extra})


@contextlib.asynccontextmanager
async def serve(routes: dict[str, Handler], host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `routes` (path -> GET/POST handler) on `host`; yields the base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    _host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class RawReceiver:
    """A callback receiver that keeps the raw body bytes and headers of every request."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = statuses or [200]
        self.seen: list[tuple[bytes, dict[str, str]]] = []
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        status = self.statuses[min(len(self.seen), len(self.statuses) - 1)]
        async with self._arrived:
            self.seen.append((raw, dict(request.headers)))
            self._arrived.notify_all()
        return web.Response(status=status)

    async def wait(self, count: int) -> list[tuple[bytes, dict[str, str]]]:
        async with asyncio.timeout(10), self._arrived:
            await self._arrived.wait_for(lambda: len(self.seen) >= count)
        return self.seen


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def stored_files(service: Service) -> list[Path]:
    root = Path(service.config.processor.storage_dir)
    return [p for p in root.rglob("*") if p.is_file()]


# -- the network policy ---------------------------------------------------------------------


async def test_download_from_loopback_is_refused_and_not_retried(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """With private networks closed, a download from 127.0.0.1 fails once, never reaching it."""
    svc = await service_factory(CLOSED)
    url = files.add("/private", b"secret")
    job_id = await svc.submit(**job_body(url, receiver.url("/cb"), max_retries=2))
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert files.count("/private") == 0
    assert job["download_attempts"] == 1
    assert job["response_code"] == 0
    assert "refused to connect to 127.0.0.1" in job["error"], job["error"]
    _s, events = await svc.get(f"/jobs/{job_id}/events")
    assert "download.retry_scheduled" not in [e["type"] for e in events["events"]]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "0.0.0.0",
        "[::]",
        "[::1]",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "[fc00::1]",
        "[fe80::1]",
        "[::ffff:127.0.0.1]",
        "224.0.0.1",
    ],
)
async def test_non_public_addresses_are_refused(
    service_factory: ServiceFactory, files: FileServer, host: str
) -> None:
    """Loopback, unspecified, private, CGNAT, link-local, unique-local and multicast are refused."""
    svc = await service_factory(CLOSED, {"api", "processor"})
    url = f"http://{host}:{files.port}/x"
    job_id = await svc.submit(
        **job_body(url, "http://callback.test/cb", max_retries=1, download_timeout=2)
    )
    job = await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed")
    assert "refused to connect to" in job["error"], job["error"]
    assert job["download_attempts"] == 1, job["error"]
    assert files.requests == {}


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1"])
async def test_non_canonical_loopback_spellings_are_refused_at_post(
    service_factory: ServiceFactory, files: FileServer, host: str
) -> None:
    """Shorthand spellings of 127.0.0.1 are a 400 naming `url` at POST: no job, no connection."""
    svc = await service_factory(CLOSED, {"api", "processor"})
    url = f"http://{host}:{files.port}/x"
    status, body = await svc.post("/download", job_body(url, "http://callback.test/cb"))
    assert status == 400, body
    assert body["field"] == "url" and "127.0.0.1" in body["error"], body
    assert await svc.storage.r.keys("dl:*:job:*") == []
    assert files.requests == {}


async def test_http_callback_to_loopback_is_refused(
    service_factory: ServiceFactory, receiver: CallbackReceiver
) -> None:
    """With private networks closed, a callback to 127.0.0.1 fails every attempt and never lands."""
    body = b"public enough"

    async def origin(_request: web.Request) -> web.Response:
        return web.Response(body=body)

    async with serve({"/f": origin}, host="127.0.0.2") as base:
        svc = await service_factory(
            {"security": {"allow_private_networks": False, "allowed_networks": ["127.0.0.2/32"]}}
        )
        job_id = await svc.submit(**job_body(f"{base}/f", receiver.url("/cb")))
        job = await svc.wait_job(job_id, lambda j: j["callback_state"] == "Failed")
    assert job["download_state"] == "Success"
    assert job["callback_attempts"] == 3
    assert "refused to connect to 127.0.0.1" in job["delivery_error"], job["delivery_error"]
    assert receiver.received == []


async def test_redirect_to_a_refused_address_fails_with_the_refusal(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A redirect from an allowed origin to a refused address fails the job, not retried."""
    hits: list[str] = []

    async def hidden(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"internal")

    async with serve({"/internal": hidden}, host="127.0.0.2") as hidden_base:
        url = files.add("/r", Reply(status=302, headers={"Location": f"{hidden_base}/internal"}))
        svc = await service_factory(
            {"security": {"allow_private_networks": False, "allowed_networks": ["127.0.0.1/32"]}}
        )
        job_id = await svc.submit(**job_body(url, receiver.url("/cb"), max_retries=2))
        [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False
    assert "refused to connect to 127.0.0.2" in cb["error"], cb["error"]
    assert files.count("/r") == 1
    assert hits == []


async def test_redirect_is_followed_when_private_networks_are_allowed(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The control of the test above: with the policy open the same redirect is followed."""

    async def hidden(_request: web.Request) -> web.Response:
        return web.Response(body=b"internal")

    async with serve({"/internal": hidden}, host="127.0.0.2") as hidden_base:
        url = files.add("/r", Reply(status=302, headers={"Location": f"{hidden_base}/internal"}))
        job_id = await service.submit(**job_body(url, receiver.url("/cb")))
        [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True, cb


# -- signed callbacks -----------------------------------------------------------------------


async def test_callbacks_are_signed_with_standard_webhooks(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """With notifier.signing_secret set, the callback's raw body verifies with Standard Webhooks."""
    secret = new_secret()
    svc = await service_factory({"notifier": {"signing_secret": secret}})
    hook = RawReceiver()
    async with serve({"/cb": hook.handle}) as base:
        job_id = await svc.submit(**job_body(files.add("/s", b"signed"), f"{base}/cb", extra="e"))
        [(raw, headers)] = await hook.wait(1)
    headers = {k.lower(): v for k, v in headers.items()}
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    payload = Webhook(secret).verify(raw, headers)
    assert (payload["job_id"], payload["success"], payload["extra"]) == (job_id, True, "e")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(raw.replace(b'"extra":"e"', b'"extra":"f"'), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(raw, headers)


async def test_retried_callbacks_keep_their_webhook_id_and_verify(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """Each attempt of a signed callback verifies, and all attempts carry the same webhook-id."""
    secret = new_secret()
    svc = await service_factory({"notifier": {"signing_secret": secret}})
    hook = RawReceiver(statuses=[500, 200])
    async with serve({"/cb": hook.handle}) as base:
        job_id = await svc.submit(**job_body(files.add("/s", b"signed"), f"{base}/cb"))
        seen = await hook.wait(2)
        await svc.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    ids = set()
    for raw, headers in seen:
        assert Webhook(secret).verify(raw, headers)["job_id"] == job_id
        ids.add(headers["webhook-id"])
    assert len(ids) == 1


async def test_callbacks_are_unsigned_without_a_secret(service: Service, files: FileServer) -> None:
    """Without notifier.signing_secret, callbacks carry no webhook signature headers."""
    hook = RawReceiver()
    async with serve({"/cb": hook.handle}) as base:
        await service.submit(**job_body(files.add("/u", b"plain"), f"{base}/cb"))
        [(_raw, headers)] = await hook.wait(1)
    assert not {"webhook-id", "webhook-signature"} & {k.lower() for k in headers}


# -- the download size limit ----------------------------------------------------------------

# Files stay put once delivered (deletion_interval in minutes) so the store can be inspected.
LIMITED = {"processor": {"max_download_bytes": 1000}, "notifier": {"deletion_interval": 10}}


def chunked(size: int, hits: list[bool]) -> Handler:
    """A handler streaming `size` bytes in 500-byte chunks with no Content-Length."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        hits.append("Content-Length" not in resp.headers)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 500):
                await resp.write(b"z" * 500)
            await resp.write_eof()
        return resp

    return handle


async def test_announced_body_over_the_limit_fails(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A body whose Content-Length exceeds max_download_bytes fails permanently, nothing stored."""
    svc = await service_factory(LIMITED)
    job_id = await svc.submit(**job_body(files.add("/big", b"x" * 5000), receiver.url("/cb")))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False
    assert "1000" in cb["error"] and "limit" in cb["error"], cb["error"]
    assert files.count("/big") == 1
    assert stored_files(svc) == []


async def test_unannounced_body_over_the_limit_fails(
    service_factory: ServiceFactory, receiver: CallbackReceiver
) -> None:
    """A chunked body without Content-Length fails once it passes max_download_bytes."""
    svc = await service_factory(LIMITED)
    hits: list[bool] = []
    async with serve({"/big": chunked(5000, hits), "/fits": chunked(1000, hits)}) as base:
        big = await svc.submit(**job_body(f"{base}/big", receiver.url("/cb"), max_retries=2))
        fits = await svc.submit(**job_body(f"{base}/fits", receiver.url("/cb")))
        [cb] = await receiver.wait_for(big)
        [ok] = await receiver.wait_for(fits)
    assert cb["success"] is False
    assert "1000" in cb["error"] and "limit" in cb["error"], cb["error"]
    assert ok["success"] is True, ok  # exactly the limit is allowed
    assert hits == [True, True]  # one request each: over the limit is not retried
    assert stored_files(svc) == [Path(svc.config.processor.storage_dir) / fits[:3] / fits]


async def test_compressed_body_over_the_limit_fails(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A gzip body announced small but inflating past max_download_bytes fails the job."""
    svc = await service_factory(LIMITED)
    bomb = gzip.compress(b"\0" * 50_000)
    assert len(bomb) < 1000
    url = files.add("/bomb", Reply(bomb, headers={"Content-Encoding": "gzip"}))
    job_id = await svc.submit(**job_body(url, receiver.url("/cb")))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is False
    assert "1000" in cb["error"] and "limit" in cb["error"], cb["error"]
    assert files.count("/bomb") == 1
    assert stored_files(svc) == []
