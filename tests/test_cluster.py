"""The service on a real Redis Cluster (three masters, each with a replica: harness.redis_cluster):
the flows end to end with every shard and master in use, the aggregation cap across two
processor processes, a master SIGKILLed mid-run, a busy shard's slot migrated mid-run, and the
chaos scenario. Every script's keys share one slot, so a script that strayed would fail here
(CROSSSLOT, or a key the node does not hold)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from downloader.config import Config
from downloader.ids import shard_of
from downloader.storage import Keys
from harness.chaos import Chaos, ChaosSpec, summary
from harness.events import EventTail
from harness.redis_cluster import ClusterGroup, Member
from harness.scale import GatedOrigin, wait_succeeded
from harness.servers import CallbackReceiver, FileServer, Reply, job_request
from tests.conftest import Proc, Service, Submitter

ServiceFactory = Callable[..., Awaitable[Service]]
MakeConfig = Callable[..., tuple[Path, Config]]


def on(cluster: ClusterGroup, **patch: Any) -> dict[str, Any]:
    """A config patch for the service on `cluster` (its masters as seed nodes)."""
    return {"redis": {"addr": cluster.addr, "cluster": True}, **patch}


async def every_job_ended_once(svc: Service, receiver: CallbackReceiver, ids: list[str]) -> None:
    """Each job has exactly one final download outcome, succeeded, and a delivered callback."""
    for job_id in ids:
        await receiver.wait_for(job_id, timeout=30)
        job = await svc.wait_job(job_id, lambda j: j["callback_state"] == "Success", timeout=30)
        assert job["download_state"] == "Success", job
        status, body = await svc.get(f"/jobs/{job_id}/events")
        assert status == 200, body
        finals = [e["type"] for e in body["events"] if e["type"] in FINAL_DOWNLOAD_EVENTS]
        assert finals == ["download.succeeded"], (job_id, finals)


FINAL_DOWNLOAD_EVENTS = {"download.succeeded", "download.failed", "job.aborted"}


async def jobs_stored(svc: Service) -> int:
    """Jobs in every shard's job index (a retried POST must not have made a second job)."""
    return sum([len(await svc.storage.job_ids(s)) for s in svc.storage.all_shards])


# -- the flows ------------------------------------------------------------------------------------


async def test_jobs_flow_end_to_end_over_every_shard_and_master(
    redis_cluster: ClusterGroup,
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """30 aggregations spread over all 16 shards and all three masters; the dashboard's lists
    read every shard; successes, a 404, a retried 503, a mime mismatch, an abort and a /retry of
    a failed callback all end as they do on one Redis."""
    api = await service_factory(on(redis_cluster), roles={"api"})
    ok = files.add("/ok", b"payload")
    cb = receiver.url("/cb")
    waiting = [
        await api.submit(**job_request(ok, cb, aggr_id=f"a{i}", aggr_limit=2))
        for i in range(30)
        for _ in range(3)
    ]
    assert {shard_of(j) for j in waiting} == set(range(16))  # placement: the least loaded shard
    for master in redis_cluster.masters:
        async with master.admin() as r:
            assert await r.dbsize() > 0, master
    status, rows = await api.get("/dashboard/aggregations?limit=100")
    assert status == 200
    assert sorted(r["name"] for r in rows) == sorted(f"jobs:a{i}" for i in range(30))
    assert {r["size"] for r in rows} == {3}
    status, details = await api.get("/dashboard/aggregations/details")
    assert status == 200 and len(details) == 30

    bad = await CallbackReceiver().start()
    bad.statuses = [500]
    try:
        missing = await api.submit(**job_request(files.url("/nope"), cb, aggr_id="a1"))
        flaky = files.add("/flaky", Reply(b"", 503), Reply(b"later"))
        retried = await api.submit(**job_request(flaky, cb, aggr_id="a2"))
        mime = await api.submit(**job_request(ok, cb, aggr_id="a3", mime_type="image/*"))
        stalled_url = files.add("/stall", Reply(b"s" * 5000, stall_after=10))
        stalled = await api.submit(**job_request(stalled_url, cb, aggr_id="slow"))
        refused = await api.submit(**job_request(ok, bad.url("/cb"), aggr_id="a4"))
        worker = await service_factory(on(redis_cluster), roles={"processor", "notifier"})

        for job_id in [*waiting, retried]:
            [payload] = await receiver.wait_for(job_id, timeout=30)
            assert payload["success"] is True, payload
        for job_id in (missing, mime):
            [payload] = await receiver.wait_for(job_id, timeout=30)
            assert payload["success"] is False, payload
        status, events = await api.get(f"/jobs/{retried}/events")
        assert status == 200
        assert [e["type"] for e in events["events"]][:5] == [
            "job.accepted",
            "download.started",
            "download.retry_scheduled",
            "download.started",
            "download.succeeded",
        ]
        await api.wait_job(stalled, lambda j: j["download_state"] == "InProgress")
        status, body = await api.http_delete(f"/jobs/{stalled}")
        assert status == 200, body
        await api.wait_job(refused, lambda j: j["callback_state"] == "Failed", timeout=20)
        bad.statuses = [200]
        status, body = await api.post(f"/retry/{refused}")
        assert status == 201, body
        await api.wait_job(refused, lambda j: j["callback_state"] == "Success", timeout=20)
        await api.wait_job(stalled, lambda j: j["callback_state"] == "Success", timeout=20)
        assert (await api.job(stalled))["download_state"] == "Failed"

        status, failures = await api.get("/dashboard/failures")
        assert status == 200
        failed = {(e["job_id"], e["type"]) for e in failures}
        assert {(missing, "download.failed"), (refused, "callback.failed")} <= failed
        assert worker.processor is not None
        status, stats = await api.get("/stats/processor")
        assert status == 200 and stats["instances"] == 1
    finally:
        await bad.close()


# -- the cap, across processes --------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_two_processors_share_a_backlog_within_the_caps(
    redis_cluster: ClusterGroup,
    make_config: MakeConfig,
    service_factory: ServiceFactory,
    receiver: CallbackReceiver,
    spawn: Callable[..., Proc],
) -> None:
    """Two processor processes with 8 workers each all work at once (the origin holds every
    answer until 16 requests wait), every job succeeds once, and no aggregation ever runs more
    than its cap of 2 downloads across the two."""
    patch = on(redis_cluster, processor={"max_workers": 8})
    config_path, config = make_config(patch, "cluster.json")
    api = await service_factory(patch, roles={"api"})
    origin = await GatedOrigin().start()
    try:
        origin.arm(open_at=16)
        ids = [
            await api.submit(
                aggr_id=f"cap{i % 10}",
                aggr_limit=2,
                url=origin.url(f"/cap{i % 10}/job{i}"),
                callback_url=receiver.url("/cb"),
            )
            for i in range(120)
        ]
        keys = Keys(config.redis.key_prefix, config.redis.shards)
        async with redis_cluster.client() as r:
            tail = EventTail(r, keys, cluster=True)
            procs = [spawn("processor", config_path) for _ in range(2)]
            try:
                succeeded = await wait_succeeded(tail, len(ids), timeout_s=90)
            finally:
                for p in procs:
                    assert p.terminate() == 0, p.log()
    finally:
        await origin.close()
    assert origin.gate.is_set()  # both processors had their 8 workers busy at once
    assert Counter(succeeded) == Counter(ids)
    assert max(origin.max_inflight.values()) <= 2, origin.max_inflight


# -- failures of the cluster ----------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_master_sigkilled_mid_run_loses_no_job(
    redis_cluster: ClusterGroup,
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """SIGKILL of a master while jobs are submitted and run: POSTs meet 503s until its replica
    is promoted, then every accepted job (before, during, after) ends once with a callback, and
    a POST retried with its Idempotency-Key never made a second job."""
    svc = await service_factory(on(redis_cluster))
    client = Submitter(svc, receiver, files.add("/f", b"payload " * 64), aggregations=12)
    before = await client.submit(20, "before")
    victim = redis_cluster.master_of_key(svc.storage.keys.events(shard_of(before[0])))
    during_task = asyncio.create_task(client.submit(20, "during", pause_s=0.05))
    await client.accepted(len(before) + 3)  # a few POSTs in: the kill lands mid-run
    heir = await redis_cluster.kill_master(victim)
    during = await during_task
    after = await client.submit(20, "after")
    ids = before + during + after
    assert len(set(ids)) == 60

    await every_job_ended_once(svc, receiver, ids)
    assert await jobs_stored(svc) == 60
    assert heir in redis_cluster.masters
    print(
        f"\n  cluster master killed: {len(ids)} jobs, {client.unavailable} POSTs answered 503, "
        f"{client.replayed} replayed, {len(receiver.received) - len(ids)} duplicate callbacks"
    )


@pytest.mark.timeout(120)
async def test_a_201_means_the_shards_replica_has_the_job(
    redis_cluster: ClusterGroup,
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """While the replica of a shard's master is frozen, a POST for that shard answers 503 (the
    write is not confirmed); once it answers again a POST gets 201, and a SIGKILL of the master
    right after it loses nothing: the promoted replica has the job and runs it."""
    svc = await service_factory(on(redis_cluster))
    url = files.add("/f", b"payload")
    cb = receiver.url("/cb")
    first = await svc.submit(**job_request(url, cb, aggr_id="acked"))
    master = redis_cluster.master_of_key(svc.storage.keys.events(shard_of(first)))
    [replica] = redis_cluster.replicas_of(master)
    replica.freeze()
    try:
        status, body = await svc.post("/download", job_request(url, cb, aggr_id="acked"))
        assert status == 503, body
    finally:
        replica.thaw()
    job_id = await svc.submit(**job_request(url, cb, aggr_id="acked", extra="kept"))
    await redis_cluster.kill_master(master)  # at once: only WAIT put the job on the replica
    [payload] = await receiver.wait_for(job_id, timeout=30)
    assert (payload["success"], payload["extra"]) == (True, "kept")


@pytest.mark.timeout(120)
async def test_a_busy_shards_slot_migrates_mid_run_without_losing_a_job(
    redis_cluster: ClusterGroup,
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """The slot of a shard with jobs queued, running and settling moves to another master
    (SETSLOT IMPORTING/MIGRATING, MIGRATE in batches) while more are submitted: the shard
    pauses (its POSTs answer 503, its scripts wait for TRYAGAIN to pass), the client follows
    ASK and MOVED, and every job ends once with a callback."""
    svc = await service_factory(on(redis_cluster))
    client = Submitter(svc, receiver, files.add("/busy", b"x" * 2000), aggregations=1)
    before = await client.submit(30, "before")
    slot = key_slot(svc.storage.keys.events(shard_of(before[0])).encode())
    source = redis_cluster.master_of(slot)
    target = next(m for m in redis_cluster.masters if m is not source)
    async with source.admin() as r:
        redirects_before = await redirect_count(r)
    tryagain_before = await tryagain_count(source, target)

    async def stretch(_moved: int) -> None:
        """After the first MIGRATE batch, until a script of the shard met the half-moved slot
        (TRYAGAIN on either node; the processors' and api's calls keep coming), so the load
        really runs into the migration however slow the machine (a bounded poll of Redis)."""
        deadline = time.monotonic() + 30
        while await tryagain_count(source, target) <= tryagain_before:
            assert time.monotonic() < deadline, "no script ran into the migration"
            await asyncio.sleep(0.02)

    during_task = asyncio.create_task(client.submit(30, "during", pause_s=0.01))
    moved = await redis_cluster.migrate_slot(slot, target, batch=5, on_batch=stretch)
    during = await during_task
    after = await client.submit(10, "after")
    assert moved > 20
    assert redis_cluster.master_of(slot) is target
    ids = before + during + after
    await every_job_ended_once(svc, receiver, ids)
    assert Counter(p["job_id"] for p in receiver.received) == Counter(ids)  # once each
    assert await jobs_stored(svc) == len(ids)
    async with source.admin() as r:
        assert await redirect_count(r) > redirects_before  # the client met ASK or MOVED
    assert await tryagain_count(source, target) > tryagain_before  # scripts waited for it
    print(
        f"\n  slot migration: {moved} keys moved, {len(ids)} jobs, "
        f"{client.unavailable} POSTs answered 503"
    )


async def redirect_count(r: Any) -> int:
    stats = await r.info("errorstats")
    return sum(int(stats.get(f"errorstat_{e}", {}).get("count", 0)) for e in ("ASK", "MOVED"))


async def tryagain_count(*nodes: Member) -> int:
    total = 0
    for node in nodes:
        async with node.admin() as r:
            stats = await r.info("errorstats")
            total += int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
    return total


@pytest.mark.timeout(120)
async def test_random_sigkills_on_a_cluster_lose_no_job(
    redis_cluster: ClusterGroup, tmp_path: Path
) -> None:
    """The chaos scenario on the cluster: api, processor and notifier processes SIGKILLed and
    restarted at random lose no job, and every job calls back as scripted."""
    spec = ChaosSpec(jobs=200, aggregations=20, min_kills=8, submit_s=6.0, drain_timeout_s=40.0)
    result = await Chaos(spec, redis_cluster.addr, tmp_path, cluster=True).run()
    print("\n  " + summary(result))
    assert result.kills >= spec.min_kills
    assert result.lost == 0, result.lost_examples
    assert result.problems == []
    assert result.jobs_in_redis == spec.jobs
    assert result.succeeded == spec.jobs - spec.jobs // 10
    assert result.failed == spec.jobs // 10
