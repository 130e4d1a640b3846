"""The storage layer against a real Redis: key names, lease fencing, registry upkeep, packing a
settled job, placing aggregations."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from downloader.errors import CallbackNotFailed, DownloadEnded
from downloader.events import PACKED_TYPE_CODES
from downloader.ids import new_job_id, shard_of
from downloader.models import parse_download_request
from downloader.storage import CALLBACK_GROUP, Storage, connect
from downloader.vocabulary import (
    CallbackOutcome,
    DownloadOutcome,
    DownloadState,
    EventType,
    FileState,
)
from harness.redis_nodes import StrRedis

ROOT = Path(__file__).resolve().parents[1]


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


async def submit(storage: Storage, aggr: str = "s", limit: int = 2) -> str:
    """A job accepted the way the API does it: in its aggregation's shard."""
    job_id = new_job_id(await storage.shard_for(aggr))
    await storage.enqueue(job_id, fields(aggr, limit))
    return job_id


SUCCEEDED = {  # the data of a download.succeeded event
    "attempt": 1,
    "response_code": 200,
    "download_url": "u",
    "file_mime_type": "text/plain",
    "file_bytes": 1,
    "image_size": "",
}


async def test_every_key_of_a_job_is_one_keys_names_in_its_shards_slot(
    make_config: Any, redis_client: StrRedis
) -> None:
    """The keys a script writes for a job and its aggregation are names storage.Keys builds,
    all in the slot of the aggregation's shard (the placement directory has its own)."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage, "ag")
        shard, k = shard_of(job_id), storage.keys
        expected = {
            k.job(job_id),
            k.ev(job_id),
            k.jobs(shard),
            k.events(shard),
            k.aggr(shard, "ag"),
            k.ready(shard, "ag"),
            k.aggregations(shard),
            k.wake(shard),
        }
        written = set(await redis_client.keys("*"))
        assert written == expected | {k.directory("ag"), k.placements}
        assert len({key_slot(key.encode()) for key in expected}) == 1
    finally:
        await storage.close()


async def test_a_stale_claim_of_the_same_owner_cannot_record(make_config: Any) -> None:
    """Leases are fenced per claim: after a lapse and a re-claim by the same processor, the first
    claim's outcome is refused and the second one's accepted."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage)
        shard = shard_of(job_id)
        first = (await storage.claim(shard, "s", "proc-A", 50, 1)).jobs[0]
        await asyncio.sleep(0.1)  # let the 50 ms lease lapse
        assert await storage.requeue_expired(shard) == 1
        second = (await storage.claim(shard, "s", "proc-A", 10_000, 1)).jobs[0]
        assert first.lease != second.lease
        assert await storage.renew(10_000, {job_id: first.lease}) == [job_id]
        refused = await storage.finish(
            job_id,
            first.lease,
            DownloadOutcome.FAILED,
            {"attempt": 1, "response_code": 0, "error": "x"},
        )
        assert not refused.recorded
        assert (
            await storage.finish(job_id, second.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED)
        ).recorded
        job = await storage.get_job(job_id)
        assert job.download_state is DownloadState.SUCCESS
    finally:
        await storage.close()


async def test_claims_respect_the_limit_and_the_registry_tracks_waiting_jobs(
    make_config: Any,
) -> None:
    """A claim never exceeds aggr_limit; the registry's size is the number of jobs waiting."""
    storage = await new_storage(make_config)
    try:
        ids = [await submit(storage, "lim", 2) for _ in range(5)]
        shard = shard_of(ids[0])
        claim = await storage.claim(shard, "lim", "p", 10_000, 10)
        assert len(claim.jobs) == 2 and claim.free_slots == 0 and claim.ready_left == 3
        assert await storage.pending_aggregations() == [("lim", 3, shard)]
        assert (await storage.claim(shard, "lim", "q", 10_000, 10)).jobs == []
    finally:
        await storage.close()


async def test_release_hands_back_only_jobs_still_held(make_config: Any, tmp_path: Path) -> None:
    """release() requeues the jobs whose lease the caller still holds, first in line."""
    storage = await new_storage(make_config)
    try:
        ids = [await submit(storage, "rel", 3) for _ in range(3)]
        shard = shard_of(ids[0])
        jobs = (await storage.claim(shard, "rel", "p", 10_000, 3)).jobs
        leases = {j.id: j.lease for j in jobs}
        leases[ids[2]] = "someone-else/0-0"
        assert await storage.release(leases) == 2
        ready = storage.keys.ready(shard, "rel")
        assert await storage.r.lrange(ready, 0, -1) == [ids[1], ids[0]]
    finally:
        await storage.close()


async def test_finish_hands_the_slot_to_the_next_job_without_a_wake(make_config: Any) -> None:
    """finish with next_owner claims the aggregation's next ready job in the same step: it is
    returned with its own lease, started, and no wake entry is written (the slot stayed
    taken). With nothing left to take, the slot frees and the wake is written as before."""
    storage = await new_storage(make_config)
    try:
        ids = [await submit(storage, "hand", 1) for _ in range(3)]
        shard, k = shard_of(ids[0]), storage.keys
        [first] = (await storage.claim(shard, "hand", "p", 10_000, 5)).jobs
        wakes = await storage.r.xlen(k.wake(shard))

        done = await storage.finish(
            ids[0], first.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED, 0, "p", 10_000
        )
        assert done.recorded and done.next_job is not None
        nxt = done.next_job
        assert nxt.id == ids[1] and nxt.lease.startswith("p/") and nxt.url
        assert await storage.r.smembers(k.inflight(shard, "hand")) == {ids[1]}
        assert await storage.r.xlen(k.wake(shard)) == wakes
        assert (await storage.get_job(ids[1])).download_state == "InProgress"
        assert await storage.pending_aggregations() == [("hand", 1, shard)]

        # a retry hands on too, and the retried job waits in the retry set
        again = await storage.finish(
            ids[1],
            nxt.lease,
            DownloadOutcome.RETRY,
            {"attempt": 1, "response_code": 500, "error": "x"},
            5_000,
            "p",
            10_000,
        )
        assert again.next_job is not None and again.next_job.id == ids[2]
        assert await storage.pending_aggregations() == []

        last = await storage.finish(
            ids[2], again.next_job.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED, 0, "p", 10_000
        )
        assert last.recorded and last.next_job is None
        assert await storage.r.scard(k.inflight(shard, "hand")) == 0
        assert await storage.r.xlen(k.wake(shard)) == wakes + 1
    finally:
        await storage.close()


async def test_finish_without_next_owner_frees_the_slot(make_config: Any) -> None:
    """Without next_owner the freed slot goes back to the queue's turn (a wake)."""
    storage = await new_storage(make_config)
    try:
        ids = [await submit(storage, "free", 1) for _ in range(2)]
        shard = shard_of(ids[0])
        [first] = (await storage.claim(shard, "free", "p", 10_000, 5)).jobs
        done = await storage.finish(ids[0], first.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED)
        assert done.recorded and done.next_job is None
        assert await storage.r.scard(storage.keys.inflight(shard, "free")) == 0
        assert await storage.pending_aggregations() == [("free", 1, shard)]
    finally:
        await storage.close()


async def test_a_settled_job_is_packed_into_one_key_and_still_reads_the_same(
    make_config: Any, redis_client: StrRedis
) -> None:
    """Once its callback failed for good (settled), a job's projection and event list become
    one string expiring after the retention period; GET-style reads give the same projection
    (folded from the events) and the same events; a /retry brings it back to life."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage, "pk")
        shard, k = shard_of(job_id), storage.keys
        [claimed] = (await storage.claim(shard, "pk", "p", 10_000, 1)).jobs
        failed = {"attempt": 1, "response_code": 404, "error": "Received status code 404"}
        await storage.finish(job_id, claimed.lease, DownloadOutcome.FAILED, failed)
        job = await storage.callback_begin(job_id)
        assert job is not None
        live = await storage.get_job(job_id)
        live_events = [e.as_json() for e in await storage.get_events(job_id)]
        end = {"attempt": 1, "delivery_error": "gone"}
        assert await storage.callback_end(job_id, CallbackOutcome.FAILED, end, "", 0)

        assert await redis_client.exists(k.job(job_id), k.ev(job_id)) == 0
        assert await redis_client.type(k.done(job_id)) == "string"
        assert 0 < await redis_client.pttl(k.done(job_id)) <= storage.retention_ms
        # short lines: the first event's id whole, then ms after the one before; type codes
        _head, *lines = (await redis_client.get(k.done(job_id))).split("\n")
        assert [line.split("\t")[1] for line in lines] == ["a", "s", "F", "c", "E"], lines
        assert lines[0].split("\t")[0] == live_events[0]["id"]
        assert all(line.startswith("+") for line in lines[1:]), lines
        packed = await storage.get_job(job_id)
        assert packed.callback_state == "Failed" and packed.delivery_error == "gone"
        assert (packed.id, packed.url, packed.created_at) == (live.id, live.url, live.created_at)
        events = [e.as_json() for e in await storage.get_events(job_id)]
        assert events[: len(live_events)] == live_events
        assert [e["type"] for e in events][-2:] == ["callback.attempted", "callback.failed"]

        with pytest.raises(DownloadEnded):  # DELETE of a packed job: 409, as when it was live
            await storage.abort(job_id, "late")
        await storage.requeue_callback(job_id)
        assert await redis_client.exists(k.done(job_id)) == 0
        revived = await storage.get_job(job_id)
        assert revived.callback_state == "Pending" and revived.file_state is FileState.NONE
        assert [e.as_json() for e in await storage.get_events(job_id)][: len(events)] == events
    finally:
        await storage.close()


async def test_a_notifier_taken_over_leaves_the_entry_to_its_new_holder(
    make_config: Any, redis_client: StrRedis
) -> None:
    """A notifier that read a callback entry and was then taken for gone (its entry moved to
    another) finds nothing to deliver, and leaves the entry pending with the new holder, who
    delivers it; a duplicate entry of a callback that ended is acknowledged and deleted."""
    storage = await new_storage(make_config)
    try:
        await storage.ensure_callback_groups()
        job_id = await submit(storage, "tk")
        shard, k = shard_of(job_id), storage.keys
        [claimed] = (await storage.claim(shard, "tk", "p", 10_000, 1)).jobs
        await storage.finish(job_id, claimed.lease, DownloadOutcome.SUCCEEDED, SUCCEEDED)
        [(_s, entry, read_id)] = await storage.read_callbacks([shard], "slow", 10, 0)
        assert read_id == job_id
        [moved] = await storage.take_over_callbacks("taker", 10)  # "slow" keeps no heartbeat
        assert (moved.shard, [e for e, _j in moved.entries]) == (shard, [entry])

        assert await storage.callback_begin(job_id, entry, "slow") is None
        pending = await redis_client.xpending(k.callbacks(shard), CALLBACK_GROUP)
        assert pending["pending"] == 1 and pending["consumers"][0]["name"] == "taker"
        job = await storage.callback_begin(job_id, entry, "taker")
        assert job is not None and job.callback_attempts == 1
        await storage.callback_end(job_id, CallbackOutcome.DELIVERED, {"attempt": 1}, entry, 0)

        duplicate = await redis_client.xadd(k.callbacks(shard), {"job_id": job_id})
        await storage.read_callbacks([shard], "taker", 10, 0)
        assert await storage.callback_begin(job_id, duplicate, "taker") is None
        assert await redis_client.xlen(k.callbacks(shard)) == 0
        assert (await redis_client.xpending(k.callbacks(shard), CALLBACK_GROUP))["pending"] == 0
    finally:
        await storage.close()


async def test_a_refused_retry_of_a_packed_job_leaves_it_packed_and_its_expiry_alone(
    make_config: Any, redis_client: StrRedis
) -> None:
    """POST /retry of a packed job whose callback was delivered is refused (not failed) and
    changes nothing: the job is not unpacked and packed again, its retention not renewed (a
    caller could otherwise keep its jobs forever)."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage, "rr")
        shard, k = shard_of(job_id), storage.keys
        [claimed] = (await storage.claim(shard, "rr", "p", 10_000, 1)).jobs
        failed = {"attempt": 1, "response_code": 404, "error": "Received status code 404"}
        await storage.finish(job_id, claimed.lease, DownloadOutcome.FAILED, failed)
        assert await storage.callback_begin(job_id) is not None
        await storage.callback_end(job_id, CallbackOutcome.DELIVERED, {"attempt": 1}, "", 0)
        packed = await redis_client.get(k.done(job_id))
        assert packed is not None
        await redis_client.pexpire(k.done(job_id), 60_000)
        with pytest.raises(CallbackNotFailed):
            await storage.requeue_callback(job_id)
        assert await redis_client.get(k.done(job_id)) == packed
        assert 0 < await redis_client.pttl(k.done(job_id)) <= 60_000
        assert await redis_client.exists(k.job(job_id), k.ev(job_id)) == 0
    finally:
        await storage.close()


async def test_packed_lines_read_the_same_by_view_and_events_old_and_new(
    make_config: Any, redis_client: StrRedis
) -> None:
    """The two readers of a packed job, view.lua (GET /jobs/{id}) and Python (its events),
    spell a short packed job out the same: ids after the first rebuilt from their ms offsets,
    a sequence number kept (`+0-1`), type codes spelled out, an unknown type kept; a job packed
    before lines were short (whole lines) reads as it was."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage, "pl")
        k = storage.keys
        accepted = (await redis_client.lrange(k.ev(job_id), 0, -1))[0]
        first_id, _, data = accepted.split("\t", 2)
        ms = int(first_id.split("-")[0])
        whole = [
            f"{first_id}\tjob.accepted\t{data}",
            f'{ms + 5}-0\tdownload.started\t{{"attempt":1}}',
            f'{ms + 5}-1\tjob.aborted\t{{"reason":"by hand"}}',
            f'{ms + 5}-2\tcallback.attempted\t{{"attempt":1}}',
            f'{ms + 9}-0\tsomething.new\t{{"x":1}}',
            f'{ms + 70}-0\tcallback.delivered\t{{"attempt":1}}',
        ]
        short = [
            f"{first_id}\ta\t{data}",
            '+5\ts\t{"attempt":1}',
            '+0-1\tx\t{"reason":"by hand"}',
            '+0-2\tc\t{"attempt":1}',
            '+4\tsomething.new\t{"x":1}',
            '+61\tC\t{"attempt":1}',
        ]
        await redis_client.delete(k.job(job_id), k.ev(job_id))
        seen = []
        for lines in (short, whole):
            await redis_client.set(k.done(job_id), "\n".join(["{}", *lines]))
            events = [e.as_json() for e in await storage.get_events(job_id)]
            assert [(e["id"], e["type"]) for e in events] == [
                tuple(line.split("\t")[:2]) for line in whole
            ]
            job = await storage.get_job(job_id)
            assert (job.download_state, job.callback_state) == ("Failed", "Success")  # folded
            seen.append((events, job))
        assert seen[0] == seen[1]
    finally:
        await storage.close()


def test_packed_type_codes_are_twins_in_lua_and_python() -> None:
    """prelude.lua's TYPE_CODE and events.PACKED_TYPE_CODES give every event type the same
    code, one code per type."""
    prelude = (ROOT / "downloader" / "scripts" / "prelude.lua").read_text()
    table = prelude.split("local TYPE_CODE = {", 1)[1].split("}", 1)[0]
    lua = dict(re.findall(r"\['([a-z._]+)'\] = '(\w+)'", table))
    assert lua == {str(t): c for t, c in PACKED_TYPE_CODES.items()}
    assert set(lua) == {str(t) for t in EventType}
    assert len(set(lua.values())) == len(lua)


async def test_new_aggregations_go_where_the_fewest_are(make_config: Any) -> None:
    """A new aggregation is placed on a shard with the fewest live aggregations, and stays
    there (remembered in the directory): 32 aggregations over 16 shards, two each."""
    storage = await new_storage(make_config)
    try:
        placed = {}
        for i in range(32):
            placed[f"p{i}"] = shard_of(await submit(storage, f"p{i}"))
        assert sorted(Counter(placed.values()).values()) == [2] * 16
        assert all([await storage.shard_for(a) == s for a, s in placed.items()])
    finally:
        await storage.close()


async def test_new_aggregations_spread_even_when_every_queue_is_empty(make_config: Any) -> None:
    """With no job waiting anywhere (a fast service), new aggregations still spread: a tie goes
    to the shard where the fewest were placed, so 48 placements are 3 per shard."""
    storage = await new_storage(make_config)
    try:
        shards = [await storage.shard_for(f"e{i}") for i in range(48)]
        assert sorted(Counter(shards).values()) == [3] * 16
    finally:
        await storage.close()


async def test_an_aggregation_whose_directory_entry_was_lost_stays_in_its_shard(
    make_config: Any, redis_client: StrRedis
) -> None:
    """The directory entry of an aggregation with jobs waiting is lost (a failed-over master
    that had not replicated it, or a lapse): another api, looking it up, finds the shard that
    still holds it rather than placing it anew (one aggregation in two shards would run at up
    to twice its cap)."""
    storage = await new_storage(make_config)
    other = await new_storage(make_config)  # another api: nothing cached
    try:
        shard = shard_of(await submit(storage, "lost"))
        for i in range(40):  # other shards get fewer aggregations than the held one's
            await submit(storage, f"filler{i}")
        await redis_client.delete(storage.keys.directory("lost"))
        assert await other.shard_for("lost") == shard
        assert await redis_client.get(storage.keys.directory("lost")) == str(shard)
    finally:
        await storage.close()
        await other.close()


async def test_trim_says_when_it_drops_events_the_export_has_not_sent(
    make_config: Any, redis_client: StrRedis
) -> None:
    """The upkeep's trim reports when the events it trims away include some after the Kafka
    export's position (they never reach the topic: the upkeep logs it); not when there is no
    export, nor when the export has sent them."""
    storage = await new_storage(make_config)
    try:
        job_id = await submit(storage, "tr")
        shard, k = shard_of(job_id), storage.keys
        later = int(time.time() * 1000) + 60_000  # every event is out of a 0 ms window then

        assert (await storage.trim(shard, 0, later))[2] is False  # no export
        sent = (await submit(storage, "tr"), await redis_client.xrange(k.events(shard)))[1]
        assert await storage.export_hold(shard, "exporter", sent[-1][0], 10_000)
        await submit(storage, "tr")  # an event after the export's position
        assert (await storage.trim(shard, 0, later))[2] is True
        await submit(storage, "tr")
        newest = (await redis_client.xrevrange(k.events(shard), count=1))[0][0]
        assert await storage.export_hold(shard, "exporter", newest, 10_000)  # all sent
        assert (await storage.trim(shard, 0, later))[2] is False
    finally:
        await storage.close()
