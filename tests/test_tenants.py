"""Tenants: what each token may see and do, quotas, per-tenant idempotency and signing, and
secrets that never show. Each test reproduces a finding of the security review on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from downloader.config import Config
from harness.redis_nodes import StrRedis
from harness.servers import CallbackReceiver, FileServer, ForwardProxy, Reply
from tests.conftest import Service

ServiceFactory = Callable[..., Any]

ROOT = "root-token-0123456789"
SHOP = "shop-submit-0123456789"
SHOP_READ = "shop-read-0123456789"
ACME = "acme-submit-0123456789"
TOKENS = [
    ROOT,
    {"name": "shop", "token": SHOP, "role": "submit", "aggr_prefix": "shop-"},
    {"name": "shop", "token": SHOP_READ, "role": "read", "aggr_prefix": "shop-"},
    {"name": "acme", "token": ACME, "role": "submit", "aggr_prefix": "acme-"},
]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(aggr: str, url: str = "http://origin.test/x", **extra: Any) -> dict[str, Any]:
    return {
        "aggr_id": aggr,
        "aggr_limit": 5,
        "url": url,
        "callback_url": "http://receiver.test/cb",
        **extra,
    }


async def call(svc: Service, method: str, path: str, token: str, **kw: Any) -> tuple[int, Any]:
    assert svc.http is not None
    async with svc.http.request(method, svc.base_url + path, headers=auth(token), **kw) as r:
        raw = await r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")


async def submit(svc: Service, token: str, **fields: Any) -> str:
    status, answer = await call(svc, "POST", "/download", token, json=body(**fields))
    assert status == 201, answer
    return str(answer["id"])


@pytest.fixture
async def tenants(service_factory: ServiceFactory) -> Service:
    """An API alone (jobs stay pending) with an admin, a shop tenant (submit + read tokens) and
    an acme tenant."""
    return await service_factory({"api": {"tokens": TOKENS}}, {"api"})  # type: ignore[no-any-return]


async def test_each_role_sees_and_acts_on_its_own_only(tenants: Service) -> None:
    """The tenant-isolation table: a token sees its tenant's jobs and aggregations (others are
    404, not 403), a read token cannot change anything (403), service-wide figures are for
    admins, and an aggr_id outside the token's prefix is refused naming aggr_id."""
    svc = tenants
    shop_job = await submit(svc, SHOP, aggr="shop-a")
    acme_job = await submit(svc, ACME, aggr="acme-a")
    root_job = await submit(svc, ROOT, aggr="ops")

    expected: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
        # submitting
        (SHOP, "POST", "/download", body("shop-b"), 201),
        (SHOP_READ, "POST", "/download", body("shop-b"), 403),
        (ACME, "POST", "/download", body("shop-b"), 400),
        (ROOT, "POST", "/download", body("shop-b"), 201),
        # one tenant's job
        (SHOP, "GET", f"/jobs/{shop_job}", None, 200),
        (SHOP_READ, "GET", f"/jobs/{shop_job}", None, 200),
        (ACME, "GET", f"/jobs/{shop_job}", None, 404),
        (ROOT, "GET", f"/jobs/{shop_job}", None, 200),
        (SHOP_READ, "GET", f"/jobs/{shop_job}/events", None, 200),
        (ACME, "GET", f"/jobs/{shop_job}/events", None, 404),
        (SHOP, "GET", f"/jobs/{acme_job}", None, 404),
        (SHOP, "GET", f"/jobs/{root_job}", None, 404),
        (SHOP, "POST", f"/retry/{acme_job}", None, 404),
        (SHOP_READ, "POST", f"/retry/{shop_job}", None, 403),
        (SHOP, "POST", f"/retry/{shop_job}", None, 409),  # allowed; the callback has not failed
        (SHOP, "DELETE", f"/jobs/{acme_job}", None, 404),
        (SHOP_READ, "DELETE", f"/jobs/{shop_job}", None, 403),
        (ACME, "DELETE", f"/jobs/{acme_job}", None, 200),
        # service-wide figures
        (SHOP, "GET", "/stats/processor", None, 403),
        (SHOP_READ, "GET", "/stats/notifier", None, 403),
        (SHOP, "GET", "/dashboard/instances", None, 403),
        (SHOP, "GET", "/metrics", None, 403),
        (ROOT, "GET", "/stats/processor", None, 200),
        (ROOT, "GET", "/metrics", None, 200),
        (SHOP, "GET", "/dashboard/aggregations", None, 200),
        (SHOP, "GET", "/dashboard/failures", None, 200),
        ("not-a-token", "GET", "/dashboard/aggregations", None, 401),
    ]
    for token, method, path, json_body, status in expected:
        got, answer = await call(svc, method, path, token, json=json_body)
        assert got == status, (token, method, path, answer)
        if status >= 400:
            assert isinstance(answer, dict) and answer.get("error"), answer
        if status == 404:
            assert answer["field"] == "job_id"

    views = {}
    for token in (SHOP, SHOP_READ, ACME, ROOT):
        _s, listed = await call(svc, "GET", "/dashboard/aggregations", token)
        views[token] = sorted(a["name"] for a in listed)
    assert views[SHOP] == views[SHOP_READ] == ["jobs:shop-a", "jobs:shop-b"]
    assert views[ACME] == []  # its only job was aborted: its aggregation is gone
    assert views[ROOT] == ["jobs:ops", "jobs:shop-a", "jobs:shop-b"]
    _s, details = await call(svc, "GET", "/dashboard/aggregations/details", SHOP)
    assert {d["aggr_id"] for d in details} == {"shop-a", "shop-b"}


async def test_a_job_records_its_tenant_and_an_unknown_token_is_401(tenants: Service) -> None:
    """GET /jobs/{id} shows which tenant submitted the job; no token, a wrong token or another
    scheme is 401 naming Authorization."""
    job_id = await submit(tenants, SHOP, aggr="shop-a")
    _s, job = await call(tenants, "GET", f"/jobs/{job_id}", SHOP_READ)
    assert job["tenant"] == "shop"
    assert tenants.http is not None
    for headers in ({}, {"Authorization": f"Basic {SHOP}"}, auth(SHOP + "x")):
        async with tenants.http.get(tenants.base_url + f"/jobs/{job_id}", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["field"] == "Authorization"


async def test_another_tenant_cannot_change_an_aggregation_nor_learn_its_proxy_password(
    tenants: Service, redis_client: StrRedis
) -> None:
    """Finding 2: a second tenant posting to a busy aggregation with its own proxy and
    aggr_limit 1 is refused (the aggregation is not under its prefix) and the limit stays; the
    owner's own 409 for a different proxy names the proxy without its password."""
    secret_proxy = "http://puser:S3CRET-PROXY-PASS@proxy.test:3128"
    await submit(tenants, SHOP, aggr="shop-busy", aggr_limit=20, aggr_proxy=secret_proxy)
    status, answer = await call(
        tenants,
        "POST",
        "/download",
        ACME,
        json=body("shop-busy", aggr_limit=1, aggr_proxy="http://attacker.test:3128"),
    )
    assert (status, answer["field"]) == (400, "aggr_id"), answer
    keys = tenants.storage.keys
    shard = await tenants.storage.shard_for("shop-busy")
    assert await redis_client.hget(keys.aggr(shard, "shop-busy"), "limit") == "20"

    status, answer = await call(
        tenants,
        "POST",
        "/download",
        SHOP,
        json=body("shop-busy", aggr_proxy="http://other.test:3128"),
    )
    assert status == 409, answer
    assert "S3CRET-PROXY-PASS" not in json.dumps(answer)
    assert "puser:***@proxy.test:3128" in answer["error"]


async def test_idempotency_keys_are_per_tenant(tenants: Service) -> None:
    """Finding 13: another tenant reusing a key gets a job of its own, not the first tenant's
    job id (nor a 422 that would confirm the key is in use); nor does an admin key spelled
    like the tenant's scoped one (`shop:order-42`) meet the tenant's `order-42`."""
    key = {"Idempotency-Key": "order-42"}
    assert tenants.http is not None

    async def post(token: str, aggr: str) -> tuple[int, dict[str, Any], str]:
        assert tenants.http is not None
        async with tenants.http.post(
            tenants.base_url + "/download", json=body(aggr), headers={**auth(token), **key}
        ) as r:
            return r.status, await r.json(), r.headers.get("Idempotent-Replayed", "")

    s1, first, _ = await post(SHOP, "shop-a")
    s2, again, replayed = await post(SHOP, "shop-a")
    s3, other, other_replayed = await post(ACME, "acme-a")
    assert (s1, s2, s3) == (201, 201, 201)
    assert again["id"] == first["id"] and replayed == "true"
    assert other["id"] != first["id"] and other_replayed == ""
    for spelled in ("shop:order-7", "shop order-7"):  # an admin key may not hold a space
        headers = {**auth(ROOT), "Idempotency-Key": spelled}
        async with tenants.http.post(
            tenants.base_url + "/download", json=body("root-a"), headers=headers
        ) as r:
            assert r.status == (201 if ":" in spelled else 400), await r.text()
    key["Idempotency-Key"] = "order-7"
    s4, _own, own_replayed = await post(SHOP, "shop-b")
    assert (s4, own_replayed) == (201, "")


async def test_tokens_may_be_configured_by_their_sha256(service_factory: ServiceFactory) -> None:
    """A token given as its SHA-256 works; the file then holds nothing usable as a token."""
    token = "a-secret-only-the-caller-has"
    digest = hashlib.sha256(token.encode()).hexdigest()
    svc = await service_factory(
        {
            "api": {
                "tokens": [
                    {"name": "hashed", "sha256": digest, "role": "submit", "aggr_prefix": "h-"}
                ]
            }
        },
        {"api"},
    )
    job_id = await submit(svc, token, aggr="h-1")
    assert (await call(svc, "GET", f"/jobs/{job_id}", token))[0] == 200
    assert (await call(svc, "GET", f"/jobs/{job_id}", digest))[0] == 401


# -- quotas (finding 10) ----------------------------------------------------------------------


async def test_extra_over_its_cap_is_refused(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """An `extra` over api.max_extra_bytes is a 400 naming extra; nothing is stored."""
    svc = await service_factory({"api": {"max_extra_bytes": 1024}}, {"api"})
    status, answer = await svc.post("/download", body("a", extra="x" * 1025))
    assert (status, answer["field"]) == (400, "extra"), answer
    assert await redis_client.keys("dl:*:job:*") == []
    assert (await svc.post("/download", body("a", extra="é" * 512)))[0] == 201  # 1024 bytes


async def test_a_token_over_its_rate_gets_429_and_others_are_unaffected(
    service_factory: ServiceFactory,
) -> None:
    """rate_per_second is a token bucket one second deep per token: past it, 429 with
    Retry-After naming Authorization; another token goes on; after Retry-After it passes."""
    slow = {"name": "slow", "token": "slow-token-012345", "aggr_prefix": "s-"}
    svc = await service_factory(
        {"api": {"tokens": [ROOT, {**slow, "rate_per_second": 0.5}]}}, {"api"}
    )
    assert svc.http is not None
    path = svc.base_url + "/dashboard/aggregations"

    async def get() -> tuple[int, dict[str, Any], str]:
        assert svc.http is not None
        async with svc.http.get(path, headers=auth("slow-token-012345")) as r:
            return r.status, await r.json(), r.headers.get("Retry-After", "")

    # at once: however slow the machine, the second finds the one-second bucket empty
    answers = sorted(await asyncio.gather(get(), get()), key=lambda a: a[0])
    assert [status for status, _b, _r in answers] == [200, 429]
    _status, refused, retry_after_header = answers[1]
    assert refused["field"] == "Authorization"
    retry_after = int(retry_after_header)
    assert 1 <= retry_after <= 2
    async with svc.http.get(path, headers=auth(ROOT)) as r:
        assert r.status == 200
    await asyncio.sleep(retry_after)
    async with svc.http.get(path, headers=auth("slow-token-012345")) as r:
        assert r.status == 200


async def test_live_aggregations_per_tenant_are_capped(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """With api.max_aggregations_per_tenant 3, a tenant's fourth live aggregation is a 429
    naming aggr_id (nothing stored); its three still take jobs; another tenant has its own
    three."""
    svc = await service_factory(
        {"api": {"tokens": TOKENS, "max_aggregations_per_tenant": 3}}, {"api"}
    )
    for i in range(3):
        await submit(svc, SHOP, aggr=f"shop-{i}")
    before = sorted(await redis_client.keys("dl:*"))
    assert svc.http is not None
    async with svc.http.post(  # nothing stored: no job, no placement, no Idempotency-Key tie
        svc.base_url + "/download",
        json=body("shop-3"),
        headers={**auth(SHOP), "Idempotency-Key": "refused-1"},
    ) as r:
        status, answer = r.status, await r.json()
    assert (status, answer["field"]) == (429, "aggr_id"), answer
    assert sorted(await redis_client.keys("dl:*")) == before
    await submit(svc, SHOP, aggr="shop-0")  # an existing one
    for i in range(3):
        await submit(svc, ACME, aggr=f"acme-{i}")
    for i in range(4):  # an admin's aggregations outside every prefix are no tenant's
        await submit(svc, ROOT, aggr=f"root-{i}")


async def test_the_aggregations_list_is_bounded_and_pages(service_factory: ServiceFactory) -> None:
    """GET /dashboard/aggregations keeps the original's array shape, at most
    api.aggregations_page_limit entries, with X-Total-Count and a Link to the next page."""
    svc = await service_factory({"api": {"aggregations_page_limit": 5}}, {"api"})
    for i in range(12):
        for _ in range(i + 1):  # aggregation i has i + 1 waiting jobs: a stable order
            assert (await svc.post("/download", body(f"p{i:02d}")))[0] == 201
    assert svc.http is not None
    seen: list[str] = []
    url = "/dashboard/aggregations"
    while url:
        async with svc.http.get(svc.base_url + url) as r:
            assert r.status == 200
            page = await r.json()
            assert r.headers["X-Total-Count"] == "12"
            assert len(page) <= 5
            seen += [a["name"] for a in page]
            link = r.headers.get("Link", "")
        url = link[1 : link.index(">")] if link else ""
    assert seen == [f"jobs:p{i:02d}" for i in reversed(range(12))]
    for query, field in (
        ("limit=0", "limit"),
        ("limit=6", "limit"),
        ("offset=-1", "offset"),
        ("offset=%C2%B2", "offset"),  # '²': a digit to str.isdigit, not to int()
        ("limit=%D9%A3", "limit"),  # an Arabic-Indic 3
    ):
        status, answer = await svc.get(f"/dashboard/aggregations?{query}")
        assert (status, answer["field"]) == (400, field), query


# -- signing per tenant (finding 11) -----------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def test_each_tenant_signs_with_its_own_secret(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A tenant with a signing secret of its own has its callbacks signed with it: its
    receiver's check fails for a callback signed with another tenant's (or the service's)."""
    shop_secret, acme_secret, service_secret = new_secret(), new_secret(), new_secret()
    svc = await service_factory(
        {
            "api": {
                "tokens": [
                    {
                        "name": "shop",
                        "token": SHOP,
                        "aggr_prefix": "shop-",
                        "signing_secret": shop_secret,
                    },
                    {
                        "name": "acme",
                        "token": ACME,
                        "aggr_prefix": "acme-",
                        "signing_secret": acme_secret,
                    },
                    ROOT,
                ]
            },
            "notifier": {"signing_secret": service_secret},
        }
    )
    url = files.add("/f.txt", b"signed\n")
    ids = {
        "shop": await submit(svc, SHOP, aggr="shop-1", url=url, callback_url=receiver.url("/s")),
        "acme": await submit(svc, ACME, aggr="acme-1", url=url, callback_url=receiver.url("/a")),
        "root": await submit(svc, ROOT, aggr="ops", url=url, callback_url=receiver.url("/r")),
    }
    secrets = {"shop": shop_secret, "acme": acme_secret, "root": service_secret}
    for who, job_id in ids.items():
        await receiver.wait_for(job_id)
        i = next(n for n, p in enumerate(receiver.received) if p["job_id"] == job_id)
        payload = {k: v for k, v in receiver.received[i].items() if k != "_status"}
        raw = json.dumps(payload, separators=(",", ":"))
        headers = receiver.headers[i]
        for other, secret in secrets.items():
            if other == who:
                Webhook(secret).verify(raw, headers)
            else:
                with pytest.raises(WebhookVerificationError):
                    Webhook(secret).verify(raw, headers)


# -- secrets never show (finding 4) ------------------------------------------------------------


class RecordingProxy(ForwardProxy):
    """A forward proxy that also records the Proxy-Authorization it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.credentials: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.credentials.append(request.headers.get("Proxy-Authorization", ""))
        return await super()._handle(request)


async def every_value_in_redis(r: StrRedis) -> dict[str, str]:
    """Each key's whole content as text (hash fields one by one, a packed job's sealed fields
    apart), to search for a secret."""
    out: dict[str, str] = {}
    async for key in r.scan_iter("*"):
        kind = await r.type(key)
        if kind == "hash":
            for field, value in (await r.hgetall(key)).items():
                out[f"{key}#{field}"] = value
        elif kind == "stream":
            out[key] = json.dumps(await r.xrange(key))
        elif kind == "string" and ":done:" in key:  # a packed job: its sealed fields, events
            head, _, events = str(await r.get(key)).partition("\n")
            out[f"{key}#sealed_fields"] = head
            out[key] = events
        elif kind == "string":
            out[key] = str(await r.get(key))
        elif kind == "list":
            out[key] = json.dumps(await r.lrange(key, 0, -1))
        elif kind == "set":
            out[key] = json.dumps(sorted(await r.smembers(key)))
        elif kind == "zset":
            out[key] = json.dumps(await r.zrange(key, 0, -1))
    return out


async def test_secrets_never_show_yet_the_download_uses_them(
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A job with URL userinfo and ?access_token=, a configured secret header, a callback URL
    with ?token= and a proxy password, and a failing one with an Authorization header: the
    proxy and the receiver get the real values (resource_url as submitted), while GET /jobs,
    its events, the failures list, the event stream (the Kafka export's source), every other
    Redis value and the logs show none of them. (URL userinfo with an Authorization header is
    refused at POST: aiohttp cannot send both.)"""
    proxy = RecordingProxy()
    await proxy.start()
    try:
        svc = await service_factory({"security": {"secret_headers": ["X-Api-Key"]}})
        seen: list[dict[str, str]] = []

        async def origin(request: web.Request) -> web.Response:
            seen.append({"query": request.query_string, **request.headers})
            return web.Response(body=b"secret-protected body\n")

        secrets = {
            "pw": "Us3rPassw0rd",
            "token": "QueryT0ken123",
            "auth": "Bearer HeaderT0ken456",
            "key": "ApiKeyValue789",
            "cb": "CallbackT0ken000",
            "proxy": "Pr0xyPassw0rd",
        }
        app = web.Application()
        app.router.add_get("/f", origin)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://user:{secrets['pw']}@127.0.0.1:{port}/f?x=1&access_token={secrets['token']}"
        callback = receiver.url(f"/cb?token={secrets['cb']}")
        headers = {"X-Api-Key": secrets["key"], "X-Plain": "p"}
        try:
            job_id = await svc.submit(
                aggr_id="sec",
                aggr_limit=2,
                url=url,
                request_headers=headers,
                aggr_proxy=f"http://pu:{secrets['proxy']}@127.0.0.1:{proxy.port}",
                callback_type="http",
                callback_dst=callback,
            )
            failing = await svc.submit(
                aggr_id="sec-direct",
                aggr_limit=2,
                url=files.add("/nf", Reply(status=404)) + f"?access_token={secrets['token']}",
                request_headers={**headers, "Authorization": secrets["auth"]},
                callback_type="http",
                callback_dst=callback,
                max_retries=0,
            )
            [delivered] = await receiver.wait_for(job_id)
            await receiver.wait_for(failing)
            await svc.wait_job(failing, lambda j: j["callback_state"] == "Success")
        finally:
            await runner.cleanup()
        # the real values went where they belong
        assert delivered["resource_url"] == url and delivered["success"] is True
        assert proxy.credentials and proxy.credentials[0].startswith("Basic ")
        assert base64.b64decode(proxy.credentials[0][6:]).decode() == f"pu:{secrets['proxy']}"
        # (this proxy drops the request headers; a direct job of the same kind carries them:
        # tests/test_download.py checks per-job headers reach the origin)

        shown = [
            await svc.get(f"/jobs/{job_id}"),
            await svc.get(f"/jobs/{job_id}/events"),
            await svc.get(f"/jobs/{failing}"),
            await svc.get(f"/jobs/{failing}/events"),
            await svc.get("/dashboard/failures"),
            await svc.get("/dashboard/aggregations/details"),
        ]
        text = json.dumps(shown)
        for name, secret in secrets.items():
            assert secret not in text, name
            assert secret.split()[-1] not in text, name
        job = shown[0][1]
        assert job["url"].startswith("http://user:***@127.0.0.1")
        assert "access_token=***" in job["url"] and "x=1" in job["url"]
        assert job["request_headers"] == {"X-Api-Key": "***", "X-Plain": "p"}
        assert shown[2][1]["request_headers"]["Authorization"] == "***"
        assert files.requests["/nf"][0]["Authorization"] == secrets["auth"]
        assert job["aggr_proxy"] == f"http://pu:***@127.0.0.1:{proxy.port}"
        assert job["callback_dst"].endswith("token=***")

        # where the real values are kept: the job's sealed fields (live or packed) and the
        # aggregation's proxy
        for where, value in (await every_value_in_redis(redis_client)).items():
            for name, secret in secrets.items():
                if secret.split()[-1] in value:
                    sealed = "#sealed_" in where or where.endswith("#proxy")
                    assert sealed, (name, where)
        assert secrets["pw"] not in capsys.readouterr().out
    finally:
        await proxy.close()


async def test_secret_values_are_scrubbed_from_error_sentences() -> None:
    """An error sentence that quotes a URL (aiohttp's Invalid URL, a redirect's Location) has
    the job's secrets masked before anything records it."""
    from downloader.config import SecurityConfig
    from downloader.redact import scrub, secrets_of

    url = "http://u:p%40ss@o.test/a?sig=abc%2Fdef&keep=1"
    found = secrets_of([url], {"Cookie": "session=xyz123"}, SecurityConfig())
    text = f"Invalid URL: {url} (cookie session=xyz123, decoded p@ss abc/def)"
    assert scrub(text, found) == (
        "Invalid URL: http://u:***@o.test/a?sig=***&keep=1 (cookie ***, decoded *** ***)"
    )


def test_a_tenant_may_not_take_the_plain_admin_tokens_name() -> None:
    """The plain admin tokens' jobs record the tenant `admin`: a submit or read token of that
    name would see and act on them (and sign their callbacks), so the config refuses it."""
    for role in ("submit", "read"):
        entry = {"name": "admin", "token": "t" * 20, "role": role, "aggr_prefix": "x-"}
        with pytest.raises(ValidationError, match="the name admin"):
            Config.model_validate({"api": {"tokens": [ROOT, entry]}})
    admin = {"name": "admin", "token": "t" * 20, "role": "admin"}
    assert Config.model_validate({"api": {"tokens": [ROOT, admin]}}).api.tokens
