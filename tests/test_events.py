"""Job events: the exact log of each kind of job, `downloader rebuild`, and retention."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness.redis_nodes import StrRedis
from harness.servers import CallbackReceiver, FileServer, Reply, job_request
from tests.conftest import ROOT, Service
from tests.images import png

STREAM_ID = re.compile(r"^\d+-\d+$")
Snapshot = dict[str, tuple[dict[str, Any], dict[str, str], int]]
"""job id -> (its view from GET /jobs, its stored projection hash ({} once packed), the PTTL of
its key: the projection's while it lives, the packed one's once settled)"""


def job_body(url: str, receiver: CallbackReceiver, **extra: object) -> dict[str, object]:
    return job_request(url, receiver.url("/cb"), **{"aggr_id": "ev", **extra})


async def events_of(service: Service, job_id: str) -> list[dict[str, Any]]:
    """GET /jobs/{id}/events, checking the common shape of every event on the way."""
    status, body = await service.get(f"/jobs/{job_id}/events")
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    ids = [e["id"] for e in events]
    assert all(STREAM_ID.match(i) for i in ids), ids
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-"))), ids
    for e in events:
        assert {"id", "type", "ts", "job_id", "data"} <= e.keys(), e
        assert e["job_id"] == job_id
        assert e["ts"].endswith("Z"), e["ts"]
        assert datetime.fromisoformat(e["ts"]).utcoffset() == timedelta(0)
    return events


def ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["ts"]).astimezone(UTC)


def since_ms(later: dict[str, Any], earlier: dict[str, Any]) -> float:
    return (ts(later) - ts(earlier)).total_seconds() * 1000


# -- the log of one job --------------------------------------------------------------------------


async def test_successful_job_event_sequence_ends_with_file_deletion(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A successful job logs accepted, started, succeeded, attempted, delivered, file.deleted."""
    body = b"hello events\n" * 40
    url = files.add("/ok.txt", body)
    job_id = await service.submit(**job_body(url, receiver, extra="x1"))
    await receiver.wait_for(job_id)
    job = await service.wait_job(job_id, lambda j: j["file_state"] == "deleted")
    stored = Path(service.config.processor.storage_dir) / job_id[:3] / job_id
    assert not stored.exists()

    events = await events_of(service, job_id)
    assert [e["type"] for e in events] == [
        "job.accepted",
        "download.started",
        "download.succeeded",
        "callback.attempted",
        "callback.delivered",
        "file.deleted",
    ]
    accepted, started, succeeded, attempted, delivered, deleted = events
    wanted = {"url": url, "aggr_id": "ev", "aggr_limit": 4, "extra": "x1", "max_retries": 2}
    assert accepted["data"].items() >= wanted.items(), accepted["data"]
    assert accepted["data"]["callback_dst"] == receiver.url("/cb")
    assert started["data"] == {"attempt": 1}
    assert succeeded["data"] == {
        "attempt": 1,
        "response_code": 200,
        "download_url": f"http://files.test/dl/{job_id[:3]}/{job_id}",
        "file_mime_type": "text/plain",
        "file_bytes": len(body),
        "image_size": "",
    }
    assert attempted["data"] == {"attempt": 1}
    assert delivered["data"] == {"attempt": 1}
    assert deleted["data"] == {}
    # notifier.deletion_interval is 0.005 min: the file goes no sooner than 300 ms after delivery
    assert since_ms(deleted, delivered) >= 300
    assert job["download_state"] == "Success" and job["callback_state"] == "Success"
    assert datetime.fromisoformat(job["created_at"]) == ts(accepted)
    assert datetime.fromisoformat(job["updated_at"]) == ts(deleted)


async def test_download_retried_twice_logs_two_retry_scheduled_events(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """500 then 503 then 200 logs two download.retry_scheduled events with codes, errors, waits."""
    url = files.add("/flaky", Reply(b"", 500), Reply(b"", 503), Reply(b"third time"))
    job_id = await service.submit(**job_body(url, receiver))
    [cb] = await receiver.wait_for(job_id)
    assert cb["success"] is True
    await service.wait_job(job_id, lambda j: j["file_state"] == "deleted")

    events = await events_of(service, job_id)
    assert [e["type"] for e in events] == [
        "job.accepted",
        "download.started",
        "download.retry_scheduled",
        "download.started",
        "download.retry_scheduled",
        "download.started",
        "download.succeeded",
        "callback.attempted",
        "callback.delivered",
        "file.deleted",
    ]
    _acc, s1, r1, s2, r2, s3, ok, *_rest = events
    assert [s["data"] for s in (s1, s2, s3)] == [{"attempt": 1}, {"attempt": 2}, {"attempt": 3}]
    for retry, attempt, code in ((r1, 1, 500), (r2, 2, 503)):
        data = dict(retry["data"])
        wait_ms = data.pop("retry_in_ms")
        assert data == {
            "attempt": attempt,
            "response_code": code,
            "error": f"Received status code {code}",
        }
        # retry n waits n x retry_backoff_seconds (10 ms) with +-10 % jitter
        assert 0.9 * 10 * attempt - 1 <= wait_ms <= 1.1 * 10 * attempt + 1
    # each retry started no sooner than it was due
    assert since_ms(s2, r1) >= r1["data"]["retry_in_ms"]
    assert since_ms(s3, r2) >= r2["data"]["retry_in_ms"]
    assert ok["data"]["attempt"] == 3 and ok["data"]["response_code"] == 200
    job = await service.job(job_id)
    assert (job["download_attempts"], job["response_code"], job["error"]) == (3, 200, "")


async def test_failed_callback_is_retried_on_the_schedule(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """Callbacks answered 500, 503, 200 log two callback.retry_scheduled, then delivered."""
    receiver.statuses = [500, 503, 200]
    job_id = await service.submit(**job_body(files.add("/cbr", b"payload"), receiver))
    cbs = await receiver.wait_for(job_id, count=3)
    assert [c["_status"] for c in cbs] == [500, 503, 200]
    await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")

    events = await events_of(service, job_id)
    callback_events = [e for e in events if e["type"].startswith("callback.")]
    assert [e["type"] for e in callback_events] == [
        "callback.attempted",
        "callback.retry_scheduled",
        "callback.attempted",
        "callback.retry_scheduled",
        "callback.attempted",
        "callback.delivered",
    ]
    a1, r1, a2, r2, a3, delivered = callback_events
    assert [a["data"] for a in (a1, a2, a3)] == [{"attempt": 1}, {"attempt": 2}, {"attempt": 3}]
    # notifier.retry_schedule_seconds is [0.01, 0.02] in the tests
    assert r1["data"] == {
        "attempt": 1,
        "delivery_error": "Received status code 500",
        "retry_in_ms": 10,
    }
    assert r2["data"] == {
        "attempt": 2,
        "delivery_error": "Received status code 503",
        "retry_in_ms": 20,
    }
    assert since_ms(a2, r1) >= 10 and since_ms(a3, r2) >= 20
    assert delivered["data"] == {"attempt": 3}
    job = await service.job(job_id)
    assert (job["callback_attempts"], job["delivery_error"]) == (3, "")


async def test_callback_that_uses_up_its_schedule_fails_and_retry_requeues_it(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """A used-up schedule logs callback.failed; POST /retry logs callback.requeued, delivers."""
    receiver.statuses = [500]
    job_id = await service.submit(**job_body(files.add("/cbf", b"payload"), receiver))
    job = await service.wait_job(job_id, lambda j: j["callback_state"] == "Failed")
    assert (job["callback_attempts"], job["delivery_error"]) == (3, "Received status code 500")
    assert job["file_state"] == "stored"  # kept so that a /retry can still point at it

    receiver.statuses = [200]
    status, _ = await service.post(f"/retry/{job_id}")
    assert status == 201
    await service.wait_job(job_id, lambda j: j["file_state"] == "deleted")

    events = await events_of(service, job_id)
    assert [e["type"] for e in events][-7:] == [
        "callback.retry_scheduled",
        "callback.attempted",
        "callback.failed",
        "callback.requeued",
        "callback.attempted",
        "callback.delivered",
        "file.deleted",
    ]
    failed = next(e for e in events if e["type"] == "callback.failed")
    assert failed["data"] == {"attempt": 3, "delivery_error": "Received status code 500"}
    again = [e for e in events if e["type"] == "callback.attempted"][-1]
    assert again["data"] == {"attempt": 1}  # a fresh round after /retry


# -- downloader rebuild --------------------------------------------------------------------------


async def run_mix(service: Service, files: FileServer, receiver: CallbackReceiver) -> list[str]:
    """Successes, failures, retried downloads, failed callbacks, a /retry and a download still
    in flight; returns the job ids once every job is at rest."""
    bad = await CallbackReceiver().start()
    bad.statuses = [500]
    try:
        stall_url = files.add("/stall", Reply(b"s" * 5000, stall_after=10))
        jobs: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {}

        async def submit(name: str, done: Callable[[dict[str, Any]], bool], **body: Any) -> None:
            jobs[name] = (await service.submit(**body), done)

        deleted = lambda j: j["file_state"] == "deleted"  # noqa: E731
        notified = lambda j: j["callback_state"] == "Success"  # noqa: E731
        cb_failed = lambda j: j["callback_state"] == "Failed"  # noqa: E731
        in_flight = lambda j: j["download_state"] == "InProgress"  # noqa: E731
        await submit("ok", deleted, **job_body(files.add("/m1", b"one"), receiver, extra="e"))
        await submit(
            "image",
            deleted,
            **job_body(files.add("/m2.png", png(4, 6)), receiver, extract_image_size=True),
        )
        await submit("missing", notified, **job_body(files.url("/nope"), receiver))
        flaky = files.add("/m3", Reply(b"", 500), Reply(b"later"))
        await submit("flaky", deleted, **job_body(flaky, receiver))
        gone = files.add("/m4", Reply(b"", 503))
        await submit("exhausted", notified, **job_body(gone, receiver, max_retries=1))
        mime = files.add("/m5", b"plain text")
        await submit("mime", notified, **job_body(mime, receiver, mime_type="image/*"))
        for name in ("cb_failed", "cb_retried"):
            url = files.add(f"/{name}", name.encode())
            await submit(name, cb_failed, **{**job_body(url, bad), "callback_dst": bad.url("/x")})
        await submit("stalled", in_flight, **job_body(stall_url, receiver, aggr_id="slow"))

        for job_id, done in jobs.values():
            await service.wait_job(job_id, done)
        bad.statuses = [200]
        retried = jobs["cb_retried"][0]
        status, _ = await service.post(f"/retry/{retried}")
        assert status == 201
        await service.wait_job(retried, deleted)
        return [job_id for job_id, _ in jobs.values()]
    finally:
        await bad.close()


async def snapshot(r: StrRedis, service: Service, ids: list[str]) -> Snapshot:
    out: Snapshot = {}
    keys = service.storage.keys
    for job_id in ids:
        stored = await r.hgetall(keys.job(job_id))
        ttl = await r.pttl(keys.job(job_id) if stored else keys.done(job_id))
        out[job_id] = (await service.job(job_id), stored, ttl)
    return out


async def run_rebuild(config_path: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "downloader",
        "rebuild",
        "-c",
        str(config_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, out
    return out.decode()


def assert_same_projections(before: Snapshot, after: Snapshot) -> None:
    for job_id, (view, stored, ttl) in before.items():
        rebuilt_view, rebuilt, rebuilt_ttl = after[job_id]
        assert (rebuilt_view, rebuilt) == (view, stored), job_id
        if ttl > 0:
            assert 0 < rebuilt_ttl <= ttl, (job_id, ttl, rebuilt_ttl)
        else:
            assert rebuilt_ttl == ttl, (job_id, ttl, rebuilt_ttl)


@pytest.fixture
async def rebuild_setup(
    service_factory: Callable[..., Any],
    make_config: Callable[..., tuple[Path, Any]],
    files: FileServer,
    receiver: CallbackReceiver,
    redis_client: StrRedis,
) -> AsyncIterator[tuple[Service, Path, str, Snapshot]]:
    """A service that ran the mix; (service, its config path, the one live job, snapshot)."""
    patch = {"processor": {"shutdown_grace_seconds": 0}}
    service: Service = await service_factory(patch)
    config_path, _ = make_config(patch, name="rebuild.json")
    ids = await run_mix(service, files, receiver)
    before = await snapshot(redis_client, service, ids)
    assert len(ids) == 9
    # the settled jobs are packed (no projection stored, an expiring key); the stalled download
    # alone has a projection, without a TTL
    [live] = [job_id for job_id, (_v, stored, _t) in before.items() if stored]
    assert all(ttl > 0 for job_id, (_v, _s, ttl) in before.items() if job_id != live)
    assert before[live][2] == -1
    yield service, config_path, live, before


async def positions(r: StrRedis, service: Service) -> list[str]:
    """The last entry of every shard's event stream."""
    keys = service.storage.keys
    return [
        str(e[0][0]) if (e := await r.xrevrange(keys.events(s), count=1)) else ""
        for s in range(keys.shards)
    ]


async def test_rebuild_restores_a_corrupted_projection_field_by_field(
    rebuild_setup: tuple[Service, Path, str, Snapshot], redis_client: StrRedis
) -> None:
    """`downloader rebuild` turns a corrupted projection back into the live one, TTL kept; the
    packed jobs need none (their projection is folded from their events whenever read)."""
    service, config_path, live, before = rebuild_setup
    position = await positions(redis_client, service)
    key = service.storage.keys.job(live)
    await redis_client.hset(key, mapping={"download_state": "Corrupt", "junk": "1"})
    await redis_client.hdel(key, "url", "callback_attempts")
    out = await run_rebuild(config_path)
    assert out.startswith("rebuilt 1 live jobs from "), out
    assert await positions(redis_client, service) == position  # nothing moved meanwhile
    assert_same_projections(before, await snapshot(redis_client, service, list(before)))


async def test_rebuild_recreates_a_deleted_projection_from_events_alone(
    rebuild_setup: tuple[Service, Path, str, Snapshot], redis_client: StrRedis
) -> None:
    """`downloader rebuild` recreates a deleted projection from the events alone."""
    service, config_path, live, before = rebuild_setup
    position = await positions(redis_client, service)
    await redis_client.delete(service.storage.keys.job(live))
    out = await run_rebuild(config_path)
    assert await positions(redis_client, service) == position
    assert out.startswith("rebuilt 1 live jobs from "), out
    assert_same_projections(before, await snapshot(redis_client, service, list(before)))


# -- retention -----------------------------------------------------------------------------------


async def test_settled_jobs_expire_after_retention_unsettled_ones_stay(
    service_factory: Callable[..., Any],
    files: FileServer,
    receiver: CallbackReceiver,
    redis_client: StrRedis,
) -> None:
    """Settled jobs' projections and events expire after retention (404); a pending one stays."""
    service: Service = await service_factory(
        {"events": {"retention_hours": 0.0003}, "notifier": {"retry_schedule_seconds": [30]}}
    )
    retention_ms = int(0.0003 * 3600 * 1000)
    keys = service.storage.keys
    failing = await CallbackReceiver().start()
    failing.statuses = [500]
    expired: set[str] = set()
    await redis_client.config_set("notify-keyspace-events", "Ex")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("__keyevent@0__:expired")
    try:
        ok = await service.submit(**job_body(files.add("/r1", b"r1"), receiver))
        missing = await service.submit(**job_body(files.url("/gone"), receiver))
        pending = await service.submit(
            **{**job_body(files.add("/r2", b"r2"), failing), "callback_dst": failing.url("/p")}
        )
        await service.wait_job(ok, lambda j: j["file_state"] == "deleted")
        await service.wait_job(missing, lambda j: j["callback_state"] == "Success")
        await service.wait_job(pending, lambda j: j["delivery_error"] != "")
        for job_id in (ok, missing):  # settled: packed into one key that expires
            assert await redis_client.exists(keys.job(job_id), keys.ev(job_id)) == 0
            assert 0 < await redis_client.pttl(keys.done(job_id)) <= retention_ms
        for key in (keys.job(pending), keys.ev(pending)):
            assert await redis_client.pttl(key) == -1, key

        wanted = {keys.done(j) for j in (ok, missing)}
        async with asyncio.timeout(10):
            while not wanted <= expired:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    expired.add(msg["data"])
        for job_id in (ok, missing):
            assert (await service.get(f"/jobs/{job_id}"))[0] == 404
            assert (await service.get(f"/jobs/{job_id}/events"))[0] == 404
        # the callback still pending outlived them, without a TTL
        job = await service.job(pending)
        assert job["callback_state"] == "Pending"
        assert job["delivery_error"] == "Received status code 500"
        for key in (keys.job(pending), keys.ev(pending)):
            assert await redis_client.pttl(key) == -1, key
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
        await redis_client.config_set("notify-keyspace-events", "")
        await failing.close()
