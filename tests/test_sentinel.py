"""Redis Sentinel: a failover in the middle of a run loses no job, and the service carries on
against the new master (a real master, replica and three sentinels on loopback)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from downloader.storage import Keys
from harness.redis_nodes import MASTER_NAME, SentinelGroup, StrRedis
from harness.servers import CallbackReceiver, FileServer
from tests.conftest import Service, Submitter

FINAL_DOWNLOAD_EVENTS = {"download.succeeded", "download.failed", "job.aborted"}
PHASE_JOBS = 20  # before the failover, during it, after it: 60 in all


async def check_every_job(
    svc: Service, receiver: CallbackReceiver, client: Submitter, master: StrRedis
) -> Counter[str]:
    """Every accepted job is on the current master and ends with exactly one final download
    outcome and a delivered callback; returns how many callbacks each job got."""
    keys = Keys("dl")
    lost = [
        k
        for k, job_id in client.ids.items()
        if not await master.exists(keys.job(job_id), keys.done(job_id))
    ]
    assert not lost, f"{len(lost)} of {len(client.ids)} accepted jobs are not on the master: {lost}"
    for job_id in client.ids.values():
        await receiver.wait_for(job_id, timeout=30)
        job = await svc.wait_job(job_id, lambda j: j["callback_state"] == "Success", timeout=30)
        assert job["download_state"] == "Success", job
        status, body = await svc.get(f"/jobs/{job_id}/events")
        assert status == 200
        finals = [e["type"] for e in body["events"] if e["type"] in FINAL_DOWNLOAD_EVENTS]
        assert finals == ["download.succeeded"], (job_id, finals)
        # what the API answered came from the master: the job (or its packed copy) is there
        assert await master.exists(keys.job(job_id), keys.done(job_id)) == 1, job_id
    return Counter(p["job_id"] for p in receiver.received)


async def run_failover(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
    failover: Callable[[], Awaitable[None]],
) -> Submitter:
    """Submit jobs before, during and after `failover`; check nothing was lost."""
    svc = await service_factory(
        {"redis": {"sentinel": True, "addr": sentinels.addr, "master_name": MASTER_NAME}}
    )
    sentinels.clients += svc.storage.r.connection_pool.sentinel_manager.sentinels
    client = Submitter(svc, receiver, files.add("/f", b"payload " * 64))
    before = await client.submit(PHASE_JOBS, "before")
    await failover()
    during = await client.submit(PHASE_JOBS, "during", pause_s=0.05)
    await sentinels.wait_master(sentinels.replica)
    after = await client.submit(PHASE_JOBS, "after")
    if sentinels.master.proc is not None and sentinels.master.proc.poll() is None:
        await sentinels.wait_demoted(sentinels.master)
    ids = before + during + after
    assert len(set(ids)) == 3 * PHASE_JOBS
    async with sentinels.replica.client() as master:
        callbacks = await check_every_job(svc, receiver, client, master)
        assert set(ids) <= set(callbacks)
        keys = svc.storage.keys
        jobs = [await master.zcard(keys.jobs(s)) for s in range(keys.shards)]
        assert sum(jobs) == len(ids)  # no duplicate job
    print(
        f"\n  sentinel failover: {len(ids)} jobs, {client.unavailable} POSTs answered 503, "
        f"{client.replayed} replayed, {sum(callbacks.values()) - len(ids)} duplicate callbacks"
    )
    return client


@pytest.mark.timeout(120)
async def test_master_sigkilled_mid_run_fails_over_without_losing_a_job(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """SIGKILL of the master mid-run (its writes replicated): POSTs get 503 until the sentinels
    promote the replica, then every job (before, during, after) ends once with a callback."""

    async def kill_master() -> None:
        await sentinels.wait_replicated()  # what the master acknowledged is on the replica
        sentinels.master.kill()

    client = await run_failover(sentinels, service_factory, files, receiver, kill_master)
    assert client.unavailable > 0  # the outage was real, and answered the documented way


@pytest.mark.timeout(120)
async def test_sentinel_failover_command_mid_run_loses_no_job(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """SENTINEL FAILOVER mid-run (the old master stays up and is demoted): no job is lost."""

    async def failover_command() -> None:
        async with sentinels.sentinels[0].client() as s:
            assert await s.execute_command("SENTINEL FAILOVER", MASTER_NAME)

    await run_failover(sentinels, service_factory, files, receiver, failover_command)


@pytest.mark.timeout(120)
async def test_job_accepted_while_the_replica_lags_survives_the_master_dying(
    sentinels: SentinelGroup,
    service_factory: Callable[..., Awaitable[Service]],
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """A POST answered while the replica has not got the job (its link cut, the replica
    frozen) is either refused (503, retried later) or survives the master's SIGKILL."""
    svc = await service_factory(
        {"redis": {"sentinel": True, "addr": sentinels.addr, "master_name": MASTER_NAME}}
    )
    sentinels.clients += svc.storage.r.connection_pool.sentinel_manager.sentinels
    client = Submitter(svc, receiver, files.add("/f", b"payload " * 64))
    await client.submit(5, "before")
    await sentinels.wait_replicated()
    sentinels.replica.freeze()  # it cannot reconnect and resync before the master dies
    try:
        async with sentinels.master.client() as m:
            assert await m.client_kill_filter(_type="replica") == 1
        assert svc.http is not None
        body = {"aggr_id": "lag", "aggr_limit": 1, "url": files.url("/f"),
                "callback_url": receiver.url("/cb")}  # fmt: skip
        async with svc.http.post(
            svc.base_url + "/download", json=body, headers={"Idempotency-Key": "lagging-0"}
        ) as resp:
            assert resp.status in (201, 503), resp.status
            if resp.status == 201:
                client.ids["lagging-0"] = (await resp.json())["id"]
        sentinels.master.kill()
    finally:
        sentinels.replica.thaw()
    await sentinels.wait_master(sentinels.replica)
    if "lagging-0" not in client.ids:
        await client.post("lagging-0", "lag")  # the refused POST, retried as the contract says
    async with sentinels.replica.client() as master:
        await check_every_job(svc, receiver, client, master)
