"""What downloads connect to and how: targets behind a proxy are checked like direct ones, and
redirects are followed by the processor itself (secret headers stay with their origin, no
https to http, no cookie jar shared between jobs)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from downloader.embedded import EmbeddedRedis
from downloader.fetch import MAX_REDIRECTS
from harness.servers import CallbackReceiver, FileServer, LoggingProxy, Reply, job_request
from tests.conftest import Proc, Service

ServiceFactory = Callable[..., Awaitable[Service]]
NO_CALLBACK = "http://callback.test/cb"  # never called: these tests run no notifier
# the proxy and the allowed origin live on 127.0.0.2, the only private address let through
BEHIND_PROXY = {
    "security": {"allow_private_networks": False, "allowed_networks": ["127.0.0.2/32"]},
    "processor": {"download_timeout_seconds": 5, "connect_timeout_seconds": 2},
}


def job(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "aggr_id": "egress",
        "aggr_limit": 4,
        "url": url,
        "callback_url": NO_CALLBACK,
        "max_retries": 0,
        **extra,
    }


class Origin:
    """An origin on `host` that records the headers of every request by path."""

    def __init__(self, routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]):
        self.routes = routes
        self.seen: dict[str, list[dict[str, str]]] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.setdefault(request.path, []).append(dict(request.headers))
        return await self.routes[request.path](request)


@contextlib.asynccontextmanager
async def origin(
    routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]],
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[str, Origin]]:
    """Serve `routes` on `host` (over TLS with `tls`); yields (base URL, the Origin)."""
    served = Origin(routes)
    app = web.Application()
    for path in routes:
        app.router.add_get(path, served._handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, host, 0, ssl_context=tls).start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://{host}:{port}", served
    finally:
        await runner.cleanup()


def answer(body: bytes = b"payload", status: int = 200, **headers: str) -> Any:
    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, headers=headers)

    return handle


@pytest.fixture
async def proxy_on_2() -> AsyncIterator[LoggingProxy]:
    proxy = await LoggingProxy("127.0.0.2").start()
    yield proxy
    await proxy.close()


async def failed(svc: Service, job_id: str) -> dict[str, Any]:
    return await svc.wait_job(job_id, lambda j: j["download_state"] == "Failed", timeout=15)


# -- 1. SSRF through a proxy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254"),
        ("http://127.0.0.1:{redis}/", "127.0.0.1"),
        ("https://10.0.0.1/", "10.0.0.1"),  # a CONNECT through the proxy
        ("http://localhost:{redis}/", "localhost = "),
        ("https://[::1]:{redis}/", "::1"),
    ],
)
async def test_a_proxied_target_is_checked_against_the_network_policy(
    service_factory: ServiceFactory,
    proxy_on_2: LoggingProxy,
    redis_server: EmbeddedRedis,
    target: str,
    refused: str,
) -> None:
    """With aggr_proxy set, a job whose target is not public fails with the refusal and the
    proxy never receives its request (plain or CONNECT, IP literal or name)."""
    svc = await service_factory(BEHIND_PROXY, {"api", "processor"})
    url = target.format(redis=redis_server.port)
    job_id = await svc.submit(**job(url, aggr_proxy=proxy_on_2.url(), max_retries=2))
    failure = await failed(svc, job_id)
    assert f"refused to connect to {refused}" in failure["error"], failure["error"]
    assert "through the proxy" in failure["error"], failure["error"]
    assert failure["download_attempts"] == 1  # a refusal is permanent
    assert proxy_on_2.seen == []


async def test_an_allowed_target_goes_through_the_proxy(
    service_factory: ServiceFactory, proxy_on_2: LoggingProxy
) -> None:
    """The control of the test above: an allowed target is fetched through the proxy, and an
    allowed https target is asked of the proxy with CONNECT."""
    svc = await service_factory(BEHIND_PROXY, {"api", "processor"})
    async with origin({"/ok": answer(b"via the proxy")}, host="127.0.0.2") as (base, served):
        ok = await svc.submit(**job(f"{base}/ok", aggr_proxy=proxy_on_2.url()))
        await svc.wait_job(ok, lambda j: j["download_state"] == "Success")
        tunnelled = base.replace("http://", "https://") + "/ok"  # TLS to a plain port: fails
        tls = await svc.submit(**job(tunnelled, aggr_proxy=proxy_on_2.url()))
        failure = await failed(svc, tls)
    authority = base.removeprefix("http://")
    assert proxy_on_2.seen == [f"GET {base}/ok", f"CONNECT {authority}"]
    assert "TLS" in failure["error"], failure["error"]
    assert len(served.seen["/ok"]) == 1


async def test_a_redirect_through_the_proxy_is_checked_at_every_hop(
    service_factory: ServiceFactory, proxy_on_2: LoggingProxy
) -> None:
    """An allowed origin redirecting to the metadata address: the proxy is asked for the first
    hop only, and the job fails with the refusal."""
    svc = await service_factory(BEHIND_PROXY, {"api", "processor"})
    metadata = "http://169.254.169.254/latest/meta-data/"
    async with origin({"/r": answer(status=302, Location=metadata)}, host="127.0.0.2") as (
        base,
        _served,
    ):
        job_id = await svc.submit(**job(f"{base}/r", aggr_proxy=proxy_on_2.url()))
        failure = await failed(svc, job_id)
    assert "refused to connect to 169.254.169.254 through the proxy" in failure["error"]
    assert proxy_on_2.seen == [f"GET {base}/r"]


async def test_a_proxied_redirect_to_a_malformed_host_fails_the_job_cleanly(
    service_factory: ServiceFactory, proxy_on_2: LoggingProxy
) -> None:
    """An origin behind the proxy redirecting to a host no resolver takes (an empty label):
    the job fails with a sentence naming the host, not an internal error, and the proxy is not
    asked for it."""
    svc = await service_factory(BEHIND_PROXY, {"api", "processor"})
    async with origin({"/r": answer(status=302, Location="http://a..b/x")}, host="127.0.0.2") as (
        base,
        _served,
    ):
        job_id = await svc.submit(**job(f"{base}/r", aggr_proxy=proxy_on_2.url()))
        failure = await failed(svc, job_id)
    assert "Invalid URL" in failure["error"] and "a..b" in failure["error"], failure["error"]
    assert proxy_on_2.seen == [f"GET {base}/r"]


# -- 8. IPv6 forms embedding IPv4 -------------------------------------------------------------


async def test_a_nat64_address_of_loopback_is_refused_at_connect(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """A job to http://[64:ff9b::7f00:1]:PORT/ (NAT64 for 127.0.0.1) is refused at connect."""
    svc = await service_factory(
        {"security": {"allow_private_networks": False}}, {"api", "processor"}
    )
    url = f"http://[64:ff9b::7f00:1]:{files.port}/x"
    files.add("/x", b"private")
    job_id = await svc.submit(**job(url, download_timeout=5))
    failure = await failed(svc, job_id)
    assert "refused to connect to 64:ff9b::7f00:1" in failure["error"], failure["error"]
    assert files.count("/x") == 0


# -- 16. redirects ----------------------------------------------------------------------------

SECRET_HEADERS = {"security": {"secret_headers": ["X-Api-Key"]}}
SENT = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y", "X-Plain": "plain"}


@pytest.mark.parametrize("other_host", ["127.0.0.3", "127.0.0.1"])
async def test_secret_headers_are_dropped_on_a_cross_origin_redirect(
    service_factory: ServiceFactory, files: FileServer, other_host: str
) -> None:
    """A redirect to another origin (another host, or the same host on another port) carries
    neither Authorization nor a configured secret header; other headers go on."""
    svc = await service_factory(SECRET_HEADERS, {"api", "processor"})
    async with origin({"/there": answer(b"moved")}, host=other_host) as (base, there):
        url = files.add("/here", Reply(status=302, headers={"Location": f"{base}/there"}))
        job_id = await svc.submit(**job(url, request_headers=SENT))
        await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")
    [first] = files.requests["/here"]
    assert {first[k] for k in SENT} == set(SENT.values())
    [second] = there.seen["/there"]
    assert "Authorization" not in second and "X-Api-Key" not in second, second
    assert second["X-Plain"] == "plain"


async def test_secret_headers_follow_a_same_origin_redirect(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """A redirect within the origin keeps Authorization and the configured secret headers."""
    svc = await service_factory(SECRET_HEADERS, {"api", "processor"})
    files.add("/b", b"same origin")
    url = files.add("/a", Reply(status=301, headers={"Location": "/b"}))
    job_id = await svc.submit(**job(url, request_headers=SENT))
    await svc.wait_job(job_id, lambda j: j["download_state"] == "Success")
    [second] = files.requests["/b"]
    assert {k: second[k] for k in SENT} == SENT


async def test_redirects_are_bounded_and_non_http_locations_refused(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """MAX_REDIRECTS redirects are followed, one more fails the job; a redirect to a non-http
    location fails it too."""
    svc = await service_factory(None, {"api", "processor"})
    files.add("/end", b"end")
    for n in range(MAX_REDIRECTS + 1):
        files.add(f"/hop{n}", Reply(status=307, headers={"Location": f"/hop{n + 1}"}))
    files.add(f"/hop{MAX_REDIRECTS + 1}", Reply(status=308, headers={"Location": "/end"}))
    enough = await svc.submit(**job(files.url("/hop2")))  # MAX_REDIRECTS hops to /end
    too_many = await svc.submit(**job(files.url("/hop1")))
    url = files.add("/file", Reply(status=302, headers={"Location": "file:///etc/passwd"}))
    non_http = await svc.submit(**job(url))
    await svc.wait_job(enough, lambda j: j["download_state"] == "Success")
    assert (await failed(svc, too_many))["error"] == "Too many redirects"
    assert "Invalid URL" in (await failed(svc, non_http))["error"]


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def spawn_trusting(
    spawn: Callable[..., Proc],
    make_config: Callable[..., tuple[Path, Any]],
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patch: dict[str, Any],
) -> Proc:
    """A processor OS process that trusts `ca` (OpenSSL reads SSL_CERT_FILE as it starts)."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    config_path, _config = make_config(patch)
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    return spawn("processor", config_path)


@pytest.mark.parametrize("allowed", [False, True])
async def test_a_redirect_from_https_to_http_is_refused_unless_configured(
    service_factory: ServiceFactory,
    spawn: Callable[..., Proc],
    make_config: Callable[..., tuple[Path, Any]],
    files: FileServer,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    allowed: bool,
) -> None:
    """An https origin redirecting to http fails the job with a sentence, and the http origin
    is never asked; security.allow_https_downgrade: true follows it. (An https to https
    redirect is followed either way.)"""
    patch = {"security": {"allow_https_downgrade": allowed}}
    svc = await service_factory(patch, {"api"})
    await spawn_trusting(spawn, make_config, tls_ca, tmp_path, monkeypatch, patch)
    plain = files.add("/plain", b"over plain http")
    routes = {"/ok": answer(b"over tls"), "/down": answer(status=302, Location=plain)}
    async with origin(routes, tls=tls_server(tls_ca)) as (base, _served):
        url = files.add("/up", Reply(status=302, headers={"Location": f"{base}/ok"}))
        secure = await svc.submit(**job(url))
        down = await svc.submit(**job(f"{base}/down"))
        await svc.wait_job(secure, lambda j: j["download_state"] == "Success", timeout=20)
        done = await svc.wait_job(down, lambda j: j["download_state"] in ("Success", "Failed"))
    if allowed:
        assert done["download_state"] == "Success", done
        assert files.count("/plain") == 1
    else:
        assert done["error"] == (
            "refused to follow a redirect from https to http (127.0.0.1): "
            "security.allow_https_downgrade is false"
        )
        assert files.count("/plain") == 0


async def test_a_cookie_set_by_one_job_s_origin_is_not_sent_with_another_job(
    service_factory: ServiceFactory, files: FileServer
) -> None:
    """The processor keeps no cookie jar: a Set-Cookie answered to one job never comes back
    in another job's request to the same site."""
    svc = await service_factory(None, {"api", "processor"})
    files.add("/set", Reply(b"one", headers={"Set-Cookie": "session=tenant-a; Path=/"}))
    files.add("/get", b"two")
    site = f"http://localhost:{files.port}"
    first = await svc.submit(**job(f"{site}/set", aggr_id="tenant-a"))
    await svc.wait_job(first, lambda j: j["download_state"] == "Success")
    second = await svc.submit(**job(f"{site}/get", aggr_id="tenant-b"))
    await svc.wait_job(second, lambda j: j["download_state"] == "Success")
    [request] = files.requests["/get"]
    assert "Cookie" not in request, request


async def test_a_redirect_to_credentials_the_client_cannot_send_fails_cleanly(
    service_factory: Any, receiver: CallbackReceiver
) -> None:
    """A redirect whose Location carries credentials aiohttp cannot encode (not Latin-1) fails
    the job with a sentence, never `Internal error`; the credentials do not show."""
    svc = await service_factory()

    async def hop(request: web.Request) -> web.Response:
        host = request.host
        raise web.HTTPFound(f"http://%E2%82%AC:s3cr%E2%82%ACt@{host}/final")

    app = web.Application()
    app.router.add_get("/start", hop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        job_id = await svc.submit(
            **job_request(f"http://127.0.0.1:{port}/start", receiver.url("/cb"), max_retries=0)
        )
        [callback] = await receiver.wait_for(job_id)
    finally:
        await runner.cleanup()
    assert callback["success"] is False
    assert "Internal error" not in callback["error"], callback["error"]
    assert "s3cr" not in callback["error"]
