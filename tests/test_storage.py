"""The storage layer against a real Redis: key names, lease fencing, registry upkeep."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from downloader.models import parse_download_request
from downloader.storage import Storage, connect
from downloader.vocabulary import DownloadOutcome, DownloadState
from harness.redis_nodes import StrRedis


async def new_storage(make_config: Any) -> Storage:
    _path, config = make_config()
    return Storage(connect(config), config)


def fields(aggr: str = "s", limit: int = 2) -> dict[str, Any]:
    req = parse_download_request(
        {
            "aggr_id": aggr,
            "aggr_limit": limit,
            "url": "http://o.test/x",
            "callback_url": "http://c.test/",
        }
    )
    return req.job_fields(2)


SUCCEEDED = {  # the data of a download.succeeded event
    "attempt": 1,
    "response_code": 200,
    "download_url": "u",
    "file_mime_type": "text/plain",
    "file_bytes": 1,
    "image_size": "",
}


async def test_lua_builds_the_same_key_names_as_python(
    make_config: Any, redis_client: StrRedis
) -> None:
    """Every key a script writes for a job and its aggregation is one storage.Keys names."""
    storage = await new_storage(make_config)
    try:
        await storage.enqueue("Job1", fields("ag"))
        k = storage.keys
        expected = {
            k.job("Job1"),
            k.job_events("Job1"),
            k.events,
            k.aggr("ag"),
            k.ready("ag"),
            k.aggregations,
            k.wake,
        }
        assert set(await redis_client.keys("*")) == expected
    finally:
        await storage.close()


async def test_a_stale_claim_of_the_same_owner_cannot_record(make_config: Any) -> None:
    """Leases are fenced per claim: after a lapse and a re-claim by the same processor, the first
    claim's outcome is refused and the second one's accepted."""
    storage = await new_storage(make_config)
    try:
        await storage.enqueue("Job2", fields())
        first = (await storage.claim("s", "proc-A", 50, 1)).jobs[0]
        await asyncio.sleep(0.1)  # let the 50 ms lease lapse
        assert await storage.requeue_expired() == 1
        second = (await storage.claim("s", "proc-A", 10_000, 1)).jobs[0]
        assert first.lease != second.lease
        assert await storage.renew(10_000, {"Job2": first.lease}) == ["Job2"]
        refused = await storage.finish(
            "Job2",
            first.lease,
            DownloadOutcome.FAILED,
            {"attempt": 1, "response_code": 0, "error": "x"},
        )
        assert not refused.recorded
        assert (
            await storage.finish("Job2", second.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED)
        ).recorded
        job = await storage.get_job("Job2")
        assert job.download_state is DownloadState.SUCCESS
    finally:
        await storage.close()


async def test_claims_respect_the_limit_and_the_registry_tracks_waiting_jobs(
    make_config: Any,
) -> None:
    """A claim never exceeds aggr_limit; the registry's size is the number of jobs waiting."""
    storage = await new_storage(make_config)
    try:
        for i in range(5):
            await storage.enqueue(f"Lim{i}", fields("lim", limit=2))
        claim = await storage.claim("lim", "p", 10_000, 10)
        assert len(claim.jobs) == 2 and claim.free_slots == 0 and claim.ready_left == 3
        assert await storage.pending_aggregations() == [("lim", 3)]
        assert (await storage.claim("lim", "q", 10_000, 10)).jobs == []
    finally:
        await storage.close()


async def test_release_hands_back_only_jobs_still_held(make_config: Any, tmp_path: Path) -> None:
    """release() requeues the jobs whose lease the caller still holds, first in line."""
    storage = await new_storage(make_config)
    try:
        for i in range(3):
            await storage.enqueue(f"Rel{i}", fields("rel", limit=3))
        jobs = (await storage.claim("rel", "p", 10_000, 3)).jobs
        leases = {j.id: j.lease for j in jobs}
        leases["Rel2"] = "someone-else/0-0"
        assert await storage.release(leases) == 2
        assert await storage.r.lrange(storage.keys.ready("rel"), 0, -1) == ["Rel1", "Rel0"]
    finally:
        await storage.close()


async def test_finish_hands_the_slot_to_the_next_job_without_a_wake(make_config: Any) -> None:
    """finish with next_owner claims the aggregation's next ready job in the same step: it is
    returned with its own lease, started, and no wake entry is written (the slot stayed
    taken). With nothing left to take, the slot frees and the wake is written as before."""
    storage = await new_storage(make_config)
    try:
        for i in range(3):
            await storage.enqueue(f"Hand{i}", fields("hand", limit=1))
        [first] = (await storage.claim("hand", "p", 10_000, 5)).jobs
        wakes = await storage.r.xlen(storage.keys.wake)

        done = await storage.finish(
            "Hand0", first.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED, 0, "p", 10_000
        )
        assert done.recorded and done.next_job is not None
        nxt = done.next_job
        assert nxt.id == "Hand1" and nxt.lease.startswith("p/") and nxt.url
        assert await storage.r.smembers(storage.keys.inflight("hand")) == {"Hand1"}
        assert await storage.r.xlen(storage.keys.wake) == wakes
        assert (await storage.get_job("Hand1")).download_state == "InProgress"
        assert await storage.pending_aggregations() == [("hand", 1)]

        # a retry hands on too, and the retried job waits in the retry set
        again = await storage.finish(
            "Hand1",
            nxt.lease,
            DownloadOutcome.RETRY,
            {"attempt": 1, "response_code": 500, "error": "x"},
            5_000,
            "p",
            10_000,
        )
        assert again.next_job is not None and again.next_job.id == "Hand2"
        assert await storage.pending_aggregations() == []

        last = await storage.finish(
            "Hand2", again.next_job.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED, 0, "p", 10_000
        )
        assert last.recorded and last.next_job is None
        assert await storage.r.scard(storage.keys.inflight("hand")) == 0
        assert await storage.r.xlen(storage.keys.wake) == wakes + 1
    finally:
        await storage.close()


async def test_finish_without_next_owner_frees_the_slot(make_config: Any) -> None:
    storage = await new_storage(make_config)
    try:
        for i in range(2):
            await storage.enqueue(f"Free{i}", fields("free", limit=1))
        [first] = (await storage.claim("free", "p", 10_000, 5)).jobs
        done = await storage.finish("Free0", first.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED)
        assert done.recorded and done.next_job is None
        assert await storage.r.scard(storage.keys.inflight("free")) == 0
        assert await storage.pending_aggregations() == [("free", 1)]
    finally:
        await storage.close()
