"""The HTTP API through HTTP only: validation, errors as JSON, heartbeat, retry, dashboard,
stats, job state and events, bearer tokens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness.redis_nodes import StrRedis, data_keys
from harness.servers import (
    CallbackReceiver,
    FileServer,
    ForwardProxy,
    Reply,
    free_port,
    valid_body,
)
from tests.conftest import Service

ServiceFactory = Callable[..., Any]
UNKNOWN_ID = "NoSuchJob00000"


def without(*keys: str, **extra: Any) -> dict[str, Any]:
    """valid_body() without `keys`, plus `extra`."""
    return {k: v for k, v in valid_body(**extra).items() if k not in keys}


def job_body(url: str, receiver: CallbackReceiver, **extra: Any) -> dict[str, Any]:
    return valid_body(url=url, callback_dst=receiver.url("/cb"), **extra)


async def job_keys(redis_client: StrRedis) -> list[str]:
    """Sorted: SCAN's order changes when Redis resizes its table (heartbeats add keys)."""
    return sorted([k async for k in redis_client.scan_iter(match="dl:*:job:*")])


async def post_raw(service: Service, path: str, data: bytes, **kw: Any) -> tuple[int, str, Any]:
    """POST bytes as they are: (status, content type, decoded JSON body)."""
    assert service.http is not None
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    async with service.http.post(service.base_url + path, data=data, headers=headers, **kw) as r:
        return r.status, r.content_type, json.loads(await r.read())


async def request(service: Service, method: str, path: str, **kw: Any) -> tuple[int, str, bytes]:
    assert service.http is not None
    async with service.http.request(method, service.base_url + path, **kw) as r:
        return r.status, r.content_type, await r.read()


async def poll_stats(
    service: Service, role: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """GET /stats/<role> until `done` holds: stats are published periodically (100 ms here),
    so a short bounded poll is the only way to see them."""
    deadline = time.monotonic() + 5
    while True:
        status, stats = await service.get(f"/stats/{role}")
        assert status == 200, stats
        if done(stats):
            return dict(stats)
        assert time.monotonic() < deadline, f"/stats/{role} never got there: {stats}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def api(service_factory: ServiceFactory) -> Service:
    """The API alone: jobs stay queued, nothing downloads them."""
    return await service_factory(None, {"api"})  # type: ignore[no-any-return]


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


INVALID_BODIES = [
    pytest.param(as_json(valid_body(aggr_limit="10")), "aggr_limit", id="aggr_limit-string"),
    pytest.param(as_json(valid_body(aggr_limit=1.5)), "aggr_limit", id="aggr_limit-float"),
    pytest.param(as_json(valid_body(aggr_limit=True)), "aggr_limit", id="aggr_limit-bool"),
    pytest.param(as_json(valid_body(aggr_limit=0)), "aggr_limit", id="aggr_limit-0"),
    pytest.param(as_json(valid_body(aggr_limit=-1)), "aggr_limit", id="aggr_limit-negative"),
    pytest.param(
        as_json(valid_body(extract_image_size="yes")),
        "extract_image_size",
        id="extract_image_size-yes",
    ),
    pytest.param(
        as_json(valid_body(request_headers={"X-Flag": True})),
        "request_headers",
        id="header-value-bool",
    ),
    pytest.param(
        as_json(valid_body(request_headers={"X-Flag": None})),
        "request_headers",
        id="header-value-null",
    ),
    pytest.param(
        as_json(valid_body(request_headers="X-A: b")), "request_headers", id="headers-not-object"
    ),
    pytest.param(
        as_json(valid_body(request_headers={"Bad Header": "x"})),
        "request_headers",
        id="header-name-space",
    ),
    pytest.param(as_json(without("aggr_id")), "aggr_id", id="aggr_id-missing"),
    pytest.param(as_json(valid_body(aggr_id="")), "aggr_id", id="aggr_id-empty"),
    pytest.param(as_json(without("aggr_limit")), "aggr_limit", id="aggr_limit-missing"),
    pytest.param(as_json(without("url")), "url", id="url-missing"),
    pytest.param(as_json(valid_body(url=5)), "url", id="url-int"),
    pytest.param(as_json(valid_body(url="ftp://origin.test/a")), "url", id="url-ftp"),
    pytest.param(as_json(valid_body(url="/relative/a.png")), "url", id="url-relative"),
    pytest.param(as_json(valid_body(url="http://")), "url", id="url-no-host"),
    pytest.param(
        as_json(valid_body(aggr_proxy="socks5://proxy.test:1080")), "aggr_proxy", id="proxy-socks"
    ),
    pytest.param(as_json(valid_body(mime_type="image")), "mime_type", id="mime-no-slash"),
    pytest.param(as_json(valid_body(mime_type="image/*,,")), "mime_type", id="mime-empty-part"),
    pytest.param(as_json(without("callback_dst")), "callback_dst", id="callback_dst-missing"),
    pytest.param(as_json(without("callback_type")), "callback_type", id="callback_type-missing"),
    pytest.param(
        as_json(valid_body(callback_type="smtp")), "callback_type", id="callback_type-unknown"
    ),
    pytest.param(
        as_json(valid_body(callback_dst="/relative")), "callback_dst", id="callback_dst-relative"
    ),
    pytest.param(
        as_json(valid_body(callback_url="http://receiver.test/legacy")),
        "callback_url",
        id="callback_url-with-type",
    ),
    pytest.param(
        as_json(without("callback_type", "callback_dst", callback_url="not a url")),
        "callback_url",
        id="callback_url-invalid",
    ),
    pytest.param(
        as_json(valid_body(callback_type="kafka", callback_dst="my topic")),
        "callback_dst",
        id="kafka-topic-space",
    ),
    pytest.param(
        as_json(without("callback_type", "callback_dst")),
        "callback",
        id="no-callback",
    ),
    pytest.param(as_json(valid_body(s3_bucket="b")), "s3_region", id="s3_bucket-alone"),
    pytest.param(as_json(valid_body(s3_region="eu-west-1")), "s3_bucket", id="s3_region-alone"),
    pytest.param(as_json(valid_body(colour="blue")), "colour", id="unknown-field"),
    pytest.param(as_json(valid_body(extra=5)), "extra", id="extra-int"),
    pytest.param(
        as_json(valid_body(download_timeout=-1)), "download_timeout", id="download_timeout-neg"
    ),
    pytest.param(
        as_json(valid_body(download_timeout="60")), "download_timeout", id="download_timeout-str"
    ),
    pytest.param(as_json(valid_body(max_retries=-1)), "max_retries", id="max_retries-negative"),
    pytest.param(as_json([valid_body()]), "body", id="body-array"),
    pytest.param(as_json(None), "body", id="body-null"),
    pytest.param(b"{not json", "body", id="body-not-json"),
    pytest.param(b"", "body", id="body-empty"),
    pytest.param(b'{"aggr_id": "\xff"}', "body", id="body-not-utf8"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "body", id="body-deeply-nested"),
    pytest.param(
        as_json(valid_body())[:-1] + b', "extra": ' + b"[" * 500 + b"]" * 500 + b"}",
        "extra",
        id="extra-nested-500-deep",
    ),
    pytest.param(as_json(valid_body(extra="\ud800")), "extra", id="extra-lone-surrogate"),
    pytest.param(as_json(valid_body(url="http://o.test/\ud800")), "url", id="url-lone-surrogate"),
    pytest.param(
        as_json(valid_body(request_headers={"X-A": "\udfff"})),
        "request_headers",
        id="header-value-lone-surrogate",
    ),
    # hosts that resolvers read as IPv4 addresses but are not spelled as one
    pytest.param(as_json(valid_body(url="http://127.1/x")), "url", id="url-host-127.1"),
    pytest.param(as_json(valid_body(url="http://2130706433/x")), "url", id="url-host-decimal"),
    pytest.param(as_json(valid_body(url="http://0x7f.1/x")), "url", id="url-host-hex"),
    pytest.param(as_json(valid_body(url="http://127.0.0.01/x")), "url", id="url-host-octal"),
    pytest.param(
        as_json(valid_body(url="http://\uff11\uff12\uff17.0.0.1/x")), "url", id="url-fullwidth"
    ),
    pytest.param(as_json(valid_body(url="http://a..b/x")), "url", id="url-host-empty-label"),
    pytest.param(
        as_json(valid_body(callback_dst="http://0x7f.1/cb")), "callback_dst", id="cb-host-hex"
    ),
    pytest.param(
        as_json(valid_body(aggr_proxy="http://127.1:3128")), "aggr_proxy", id="proxy-127.1"
    ),
]


@pytest.mark.parametrize(("data", "field"), INVALID_BODIES)
async def test_invalid_body_is_rejected_naming_the_field_and_stores_nothing(
    api: Service, redis_client: StrRedis, data: bytes, field: str
) -> None:
    """An invalid POST /download answers 400 JSON naming the field, and Redis stays untouched."""
    before = await data_keys(redis_client)
    status, content_type, body = await post_raw(api, "/download", data)
    assert status == 400, body
    assert content_type == "application/json"
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert field in body["error"], body
    assert await data_keys(redis_client) == before == []


async def test_valid_body_is_accepted_and_stored(api: Service, redis_client: StrRedis) -> None:
    """The control case of the table above: a valid body answers 201 with an id and is stored."""
    status, content_type, body = await post_raw(api, "/download", as_json(valid_body()))
    assert (status, content_type) == (201, "application/json")
    assert set(body) == {"id"}
    assert api.storage.keys.job(body["id"]) in await job_keys(redis_client)


async def test_body_over_max_body_bytes_is_413_json(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """A body larger than api.max_body_bytes answers 413 JSON and stores nothing."""
    svc = await service_factory({"api": {"max_body_bytes": 1000}}, {"api"})
    status, content_type, body = await post_raw(
        svc, "/download", as_json(valid_body(extra="x" * 5000))
    )
    assert (status, content_type) == (413, "application/json")
    assert "1000" in body["error"]
    assert await data_keys(redis_client) == []
    fits, _ct, _body = await post_raw(svc, "/download", as_json(valid_body(extra="x" * 500)))
    assert fits == 201


async def test_wrong_method_is_405_json(api: Service) -> None:
    """GET /download answers 405 JSON with the Allow header HTTP requires (RFC 9110 15.5.6)."""
    assert api.http is not None
    async with api.http.get(api.base_url + "/download") as r:
        assert (r.status, r.content_type) == (405, "application/json")
        assert json.loads(await r.read())["error"]
        assert "POST" in r.headers.get("Allow", ""), dict(r.headers)


async def test_unknown_path_is_404_json(api: Service) -> None:
    """An unknown path answers 404 JSON."""
    status, content_type, raw = await request(api, "GET", "/no/such/path")
    assert (status, content_type) == (404, "application/json")
    assert json.loads(raw)["error"]


async def test_heartbeat_is_503_while_the_drain_file_exists(api: Service) -> None:
    """GET /hb is 200, 503 while api.heartbeat_path exists, and 200 again once it is removed."""
    drain = Path(api.config.api.heartbeat_path)
    assert (await request(api, "GET", "/hb"))[0] == 200
    await asyncio.to_thread(drain.touch)
    try:
        assert (await request(api, "GET", "/hb"))[0] == 503
    finally:
        await asyncio.to_thread(drain.unlink)
    assert (await request(api, "GET", "/hb"))[0] == 200


async def test_retry_of_unknown_job_is_404(api: Service) -> None:
    """POST /retry/{id} for an unknown job answers 404 JSON."""
    for job_id in (UNKNOWN_ID, "not-an-id!"):
        status, body = await api.post(f"/retry/{job_id}")
        assert status == 404 and body["error"], body


async def test_retry_while_the_callback_has_not_failed_is_409(
    api: Service, redis_client: StrRedis
) -> None:
    """POST /retry/{id} answers 409 while the callback is still pending, and changes nothing."""
    job_id = await api.submit(**valid_body())
    events_before = await redis_client.llen(api.storage.keys.ev(job_id))
    status, body = await api.post(f"/retry/{job_id}")
    assert status == 409 and "Pending" in body["error"], body
    assert await redis_client.llen(api.storage.keys.ev(job_id)) == events_before
    assert (await api.job(job_id))["callback_state"] == "Pending"


async def test_retry_redelivers_a_failed_callback(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A callback that failed all its attempts is delivered again after POST /retry/{id}."""
    receiver.statuses = [500]
    job_id = await service.submit(**job_body(files.add("/r", b"data"), receiver))
    failed = await service.wait_job(job_id, lambda j: j["callback_state"] == "Failed")
    assert failed["callback_attempts"] == 3
    assert failed["delivery_error"] == "Received status code 500"
    assert [cb["_status"] for cb in receiver.for_job(job_id)] == [500, 500, 500]

    receiver.statuses = [200]
    status, body = await service.post(f"/retry/{job_id}")
    assert 200 <= status < 300, body
    callbacks = await receiver.wait_for(job_id, count=4)
    assert callbacks[-1]["_status"] == 200 and callbacks[-1]["success"] is True
    done = await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert done["callback_attempts"] == 1
    assert done["delivery_error"] == ""
    _s, events = await service.get(f"/jobs/{job_id}/events")
    types = [e["type"] for e in events["events"]]
    assert types.index("callback.failed") < types.index("callback.requeued")
    assert types.index("callback.requeued") < types.index("callback.delivered")
    status, body = await service.post(f"/retry/{job_id}")
    assert status == 409, body


async def test_dashboard_lists_backed_up_aggregations_until_they_drain(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """GET /dashboard/aggregations lists queued aggregations by size; empty once processed."""
    api = await service_factory(None, {"api"})
    url = files.add("/q", b"queued")
    ids = [
        await api.submit(**job_body(url, receiver, aggr_id="slow", aggr_limit=1)) for _ in "12345"
    ]
    ids += [await api.submit(**job_body(url, receiver, aggr_id="other")) for _ in "12"]
    status, rows = await api.get("/dashboard/aggregations")
    assert status == 200
    assert rows == [{"name": "jobs:slow", "size": 5}, {"name": "jobs:other", "size": 2}]

    await service_factory(None, {"processor", "notifier"})
    for job_id in ids:
        [cb] = await receiver.wait_for(job_id)
        assert cb["success"] is True
    assert await api.get("/dashboard/aggregations") == (200, [])


async def test_stats_count_workers_failures_responses_and_callbacks(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """/stats/processor and /stats/notifier report the SPEC counters with the right values."""
    dead = f"http://127.0.0.1:{free_port()}/cb"
    ok1 = await service.submit(**job_body(files.add("/s1", b"one"), receiver, aggr_id="s1"))
    ok2 = await service.submit(**job_body(files.add("/s2", b"two"), receiver, aggr_id="s2"))
    gone = await service.submit(**job_body(files.url("/missing"), receiver, aggr_id="s3"))
    broken = await service.submit(
        **valid_body(
            url=files.add("/s4", Reply(b"", 500)), callback_dst=dead, aggr_id="s4", max_retries=0
        )
    )
    for job_id in (ok1, ok2, gone):
        await receiver.wait_for(job_id)
    await service.wait_job(broken, lambda j: j["callback_state"] == "Failed")

    proc = await poll_stats(
        service, "processor", lambda s: s["spawnedWorkers"] == 4 and s["workers"] == 0
    )
    assert proc["instances"] == 1
    assert proc["spawnedWorkerPools"] == 4  # one job per aggregation: each start opens a pool
    assert proc["workerPools"] == 0
    assert 1 <= proc["maxWorkers"] <= 4
    assert proc["maxWorkerPools"] == proc["maxWorkers"]
    assert proc["failures"] == 2
    responses = {k: v for k, v in proc.items() if k.startswith("download.response.")}
    assert responses == {
        "download.response.200": 2,
        "download.response.404": 1,
        "download.response.500": 1,
    }
    notif = await poll_stats(
        service, "notifier", lambda s: s["successfulCallbacks"] + s["failedCallbacks"] == 4
    )
    assert (notif["successfulCallbacks"], notif["failedCallbacks"]) == (3, 1)


async def test_stats_are_summed_over_processor_instances(
    service_factory: ServiceFactory, files: FileServer, receiver: CallbackReceiver
) -> None:
    """/stats/processor adds up the counters of every live processor instance."""
    svc = await service_factory(None, {"api", "notifier"})
    await service_factory(None, {"processor"})
    await service_factory(None, {"processor"})
    url = files.add("/m", b"many")
    ids = [await svc.submit(**job_body(url, receiver, aggr_id=f"m{i}")) for i in range(6)]
    for job_id in ids:
        await receiver.wait_for(job_id)
    # each instance publishes its counters on its own beat: a job's worker count and its
    # response count may reach the sum in different beats, so wait for the settled sum
    proc = await poll_stats(
        svc,
        "processor",
        lambda s: (
            (s["instances"], s["spawnedWorkers"], s.get("download.response.200")) == (2, 6, 6)
            and s["workers"] == 0
        ),
    )
    assert proc["spawnedWorkerPools"] == 6
    assert (proc["workers"], proc["workerPools"], proc["failures"]) == (0, 0, 0)


def parse_utc(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    assert ts.utcoffset() == timedelta(0), value
    return ts


async def test_job_projection_has_the_spec_fields_and_types(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """GET /jobs/{id} returns the SPEC §5 fields with their types and ISO 8601 UTC times."""
    started = datetime.now(tz=UTC) - timedelta(seconds=1)
    job_id = await service.submit(**job_body(files.add("/j", b"job"), receiver))
    job = await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    expected = {
        "id": job_id,
        "aggr_id": "a1",
        "url": files.url("/j"),
        "download_state": "Success",
        "callback_state": "Success",
        "download_attempts": 1,
        "callback_attempts": 1,
        "response_code": 200,
        "error": "",
        "delivery_error": "",
    }
    assert {k: job.get(k) for k in expected} == expected
    for k in ("download_attempts", "callback_attempts", "response_code"):
        assert type(job[k]) is int, k
    created, updated = parse_utc(job["created_at"]), parse_utc(job["updated_at"])
    assert started <= created <= updated <= datetime.now(tz=UTC) + timedelta(seconds=1)


async def test_job_projection_records_a_failed_download(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A failed download shows in the projection: state, response code and the error."""
    job_id = await service.submit(**job_body(files.url("/nope"), receiver))
    job = await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert (job["download_state"], job["response_code"]) == ("Failed", 404)
    assert job["error"] == "Received status code 404"


async def test_unknown_job_and_its_events_are_404(api: Service) -> None:
    """GET /jobs/{id} and /jobs/{id}/events answer 404 JSON for an unknown job."""
    for path in (f"/jobs/{UNKNOWN_ID}", f"/jobs/{UNKNOWN_ID}/events", "/jobs/bad!id"):
        status, body = await api.get(path)
        assert status == 404 and body["error"], (path, body)


async def test_job_events_are_listed_oldest_first(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """GET /jobs/{id}/events lists the job's events oldest first with id, type, ts, job_id, data."""
    job_id = await service.submit(**job_body(files.add("/e", b"12345"), receiver))
    await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    status, body = await service.get(f"/jobs/{job_id}/events")
    assert status == 200
    events = body["events"]
    for e in events:
        assert {"id", "type", "ts", "job_id", "data"} <= set(e), e
        assert e["job_id"] == job_id and isinstance(e["data"], dict)
    types = [e["type"] for e in events]
    assert types[:5] == [
        "job.accepted",
        "download.started",
        "download.succeeded",
        "callback.attempted",
        "callback.delivered",
    ]
    assert set(types[5:]) <= {"file.deleted"}
    stream_ids = [tuple(int(p) for p in e["id"].split("-")) for e in events]
    assert stream_ids == sorted(stream_ids) and len(set(stream_ids)) == len(stream_ids)
    stamps = [parse_utc(e["ts"]) for e in events]
    assert stamps == sorted(stamps)
    by_type = {e["type"]: e["data"] for e in events}
    assert by_type["download.started"]["attempt"] == 1
    assert by_type["download.succeeded"]["response_code"] == 200
    assert by_type["download.succeeded"]["file_bytes"] == 5
    assert by_type["job.accepted"]["url"] == files.url("/e")


PROTECTED = [
    ("POST", "/download"),
    ("GET", f"/jobs/{UNKNOWN_ID}"),
    ("GET", f"/jobs/{UNKNOWN_ID}/events"),
    ("POST", f"/retry/{UNKNOWN_ID}"),
    ("DELETE", f"/jobs/{UNKNOWN_ID}"),
    ("GET", "/dashboard/aggregations"),
    ("GET", "/dashboard/aggregations/details"),
    ("GET", "/dashboard/instances"),
    ("GET", "/dashboard/failures"),
    ("GET", "/stats/processor"),
    ("GET", "/stats/notifier"),
    ("GET", "/metrics"),
]


async def test_tokens_guard_every_endpoint_but_hb(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """With api.tokens set, every endpoint but /hb and the dashboard page answers 401 JSON
    without a valid bearer token; the page itself holds no data."""
    svc = await service_factory({"api": {"tokens": ["t0ken-a", "t0ken-b"]}}, {"api"})
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "t0ken-a"},
        {"Authorization": "Basic dDBrZW4tYQ=="},
    ]
    for method, path in PROTECTED:
        for headers in bad_headers:
            status, content_type, raw = await request(
                svc, method, path, headers=headers, json=valid_body()
            )
            assert (status, content_type) == (401, "application/json"), (method, path, headers)
            assert "token" in json.loads(raw)["error"]
    assert await data_keys(redis_client) == []
    assert (await request(svc, "GET", "/hb"))[0] == 200
    status, content_type, page = await request(svc, "GET", "/?token=t0ken-a")
    assert (status, content_type) == (200, "text/html") and b"Authorization" in page

    for token in ("t0ken-a", "t0ken-b"):
        auth = {"Authorization": f"Bearer {token}"}
        status, body = await svc.post("/download", valid_body(), headers=auth)
        assert status == 201, body
        assert await svc.get("/dashboard/aggregations", headers=auth) == (
            200,
            [{"name": "jobs:a1", "size": 1 if token == "t0ken-a" else 2}],
        )


async def test_aggr_proxy_is_fixed_while_the_aggregation_has_jobs(
    api: Service, redis_client: StrRedis
) -> None:
    """A different aggr_proxy for an aggregation with queued jobs answers 409 and stores nothing."""
    first = valid_body(aggr_id="px", aggr_proxy="http://proxy-one.test:3128")
    await api.submit(**first)
    keys = await job_keys(redis_client)
    for proxy in ("http://proxy-two.test:3128", None, ""):
        status, answer = await api.post("/download", {**first, "aggr_proxy": proxy})
        assert status == 409, answer
        assert "aggr_proxy" in answer["error"]
    assert await job_keys(redis_client) == keys
    await api.submit(**first)  # the same proxy is fine
    assert len(await job_keys(redis_client)) == len(keys) + 1  # one more job


async def test_aggr_proxy_can_change_once_the_aggregation_is_done(
    service: Service, files: FileServer, receiver: CallbackReceiver, proxy: ForwardProxy
) -> None:
    """Once an aggregation has no job left, it may come back with another (or no) proxy."""
    url = files.add("/p", b"proxied")
    first = await service.submit(**job_body(url, receiver, aggr_id="px", aggr_proxy=proxy.url("")))
    assert (await receiver.wait_for(first))[0]["success"] is True
    second = await service.submit(**job_body(url, receiver, aggr_id="px"))
    assert (await receiver.wait_for(second))[0]["success"] is True
    assert proxy.seen == [url]
    assert [h.get("X-Via-Proxy") for h in files.requests["/p"]] == ["1", None]


async def test_legacy_callback_url_works_like_callback_type_http(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The legacy callback_url gets the same HTTP callback as callback_type=http."""
    url = files.add("/legacy", b"old style")
    legacy = await service.submit(
        aggr_id="a1", aggr_limit=2, url=url, callback_url=receiver.url("/legacy"), extra="x"
    )
    modern = await service.submit(**job_body(url, receiver, extra="x"))
    [old_cb] = await receiver.wait_for(legacy)
    [new_cb] = await receiver.wait_for(modern)
    assert old_cb["success"] is True
    assert {k: v for k, v in old_cb.items() if k not in ("job_id", "download_url")} == {
        k: v for k, v in new_cb.items() if k not in ("job_id", "download_url")
    }
    job = await service.wait_job(legacy, lambda j: j["callback_state"] == "Success")
    assert (job["callback_type"], job["callback_dst"]) == ("http", receiver.url("/legacy"))
