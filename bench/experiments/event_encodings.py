"""Bytes per settled job in other encodings, replayed from jobs the service really stored.

Not the service: a plain redis-server (no AOF) and the settled jobs that bench/redis_memory.py
saves (`samples`: each job's projection hash, its stream entries and the global stream's copies
of them). For each variation, `jobs` jobs are written in that encoding (the samples cycled in
the proportions of the load mix; each job gets a fresh id of the same length, in its key names
and in its values), every per-job key with the retention TTL the service gives a settled job.
Bytes per job = growth of used_memory (less client buffers) / jobs, and the sum of
`MEMORY USAGE <key> SAMPLES 0` over the keyspace / jobs. Between variations: FLUSHALL and the
server's default settings back.

Variations (the first of each group is what the service stores today):
  events of a job: STREAM (XADD type ts v data), the same with `stream-node-max-bytes` lowered
    (it caps the 4096-byte preallocation of a new stream node), a LIST of compact JSON events,
    one STRING of a JSON array of events (full; without what is derivable: ts is the event id's
    milliseconds, v is constant; short: one-letter type codes, short data keys, empty and
    default values left out, times as ms after the first event), the short form as MessagePack
    (Lua's cmsgpack, so a script could write it).
  projection: the HASH as stored (listpack / ziplist: every value <= 64 bytes), forced to a
    hashtable, with a 100-character URL (a value over hash-max-listpack-value makes it a
    hashtable) and the same with hash-max-listpack-value 256; without the request fields (they
    are in job.accepted).
  global stream: a full copy of each event (type job_id ts v data), a reference (job_id type).
  a whole settled job: today's three; candidates built from the cheaper pieces.

    .venv/bin/python bench/experiments/event_encodings.py [--redis-server PATH] [--jobs 10000]
        [--samples bench/results/redis_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository for harness/downloader
    sys.path.insert(0, str(ROOT))

from downloader.config import RedisConfig  # noqa: E402
from downloader.embedded import find_redis_server  # noqa: E402
from downloader.storage import Keys  # noqa: E402
from harness.redis_nodes import StrRedis  # noqa: E402
from harness.servers import free_port  # noqa: E402

RETENTION_MS = 72 * 3600 * 1000
HASH_VALUE_LIMIT = "hash-max-ziplist-value"  # 7.0 also takes the pre-listpack names
HASH_ENTRIES_LIMIT = "hash-max-ziplist-entries"
BATCH = 200  # jobs per pipeline

TYPE_CODES = {
    "job.accepted": "a",
    "download.started": "s",
    "download.requeued": "q",
    "download.retry_scheduled": "r",
    "download.succeeded": "S",
    "download.failed": "F",
    "job.aborted": "x",
    "callback.attempted": "c",
    "callback.retry_scheduled": "cr",
    "callback.delivered": "C",
    "callback.failed": "CF",
    "callback.requeued": "cq",
    "file.deleted": "d",
}
FIELD_CODES = {
    "aggr_id": "a",
    "aggr_limit": "l",
    "aggr_proxy": "p",
    "url": "u",
    "callback_type": "ct",
    "callback_dst": "cd",
    "extra": "x",
    "mime_type": "m",
    "max_retries": "r",
    "extract_image_size": "i",
    "download_timeout": "t",
    "request_headers": "h",
    "s3_bucket": "sb",
    "s3_region": "sr",
    "s3_key": "sk",
    "tenant": "tn",
    "attempt": "n",
    "response_code": "rc",
    "error": "e",
    "download_url": "du",
    "file_mime_type": "fm",
    "file_bytes": "fb",
    "image_size": "is",
    "retry_in_ms": "ri",
    "delivery_error": "de",
    "reason": "why",
}
# the request fields of a projection: copies of job.accepted's data
REQUEST_FIELDS = frozenset(FIELD_CODES) - {
    "attempt",
    "response_code",
    "error",
    "download_url",
    "file_mime_type",
    "file_bytes",
    "image_size",
    "retry_in_ms",
    "delivery_error",
    "reason",
    "s3_key",
}
MSGPACK_SET = (
    "return redis.call('SET', KEYS[1], cmsgpack.pack(cjson.decode(ARGV[1])), 'PX', ARGV[2])"
)


@dataclass(frozen=True)
class Job:
    """One settled job as the service stored it."""

    id: str
    projection: dict[str, str]
    events: list[tuple[str, dict[str, str]]]  # (event id, stream fields: type ts v data)

    def renamed(self, new_id: str) -> Job:
        """The same job under another id (of the same length), in its values too."""

        def sub(s: str) -> str:
            return s.replace(self.id, new_id)

        return Job(
            new_id,
            {k: sub(v) for k, v in self.projection.items()},
            [(eid, {k: sub(v) for k, v in f.items()}) for eid, f in self.events],
        )

    def with_url(self, chars: int) -> Job:
        """The job with its URL padded to `chars` characters (in the projection and events)."""
        url = self.projection["url"]
        longer = url[:-4] + "0" * (chars - len(url)) + url[-4:]
        events = [(eid, {**f, "data": f["data"].replace(url, longer)}) for eid, f in self.events]
        return Job(self.id, {**self.projection, "url": longer}, events)


KEYS = Keys(RedisConfig().key_prefix)


def job_key(job: Job) -> str:
    return KEYS.job(job.id)


def events_key(job: Job) -> str:
    """Where the job's events are, whatever their encoding."""
    return KEYS.job_events(job.id)


# -- the encodings -----------------------------------------------------------------------------


def full_events(job: Job) -> list[dict[str, Any]]:
    return [
        {"id": eid, "type": f["type"], "ts": int(f["ts"]), "v": int(f["v"]), "data": data(f)}
        for eid, f in job.events
    ]


def data(fields: dict[str, str]) -> Any:
    return json.loads(fields["data"])


def underivable_events(job: Job) -> list[list[Any]]:
    """[id, type, data]: ts is the id's milliseconds, v is always 1."""
    return [[eid, f["type"], data(f)] for eid, f in job.events]


def _is_default(v: Any) -> bool:
    return v in ("", 0, False, {}, None) and v is not True


def short_events(job: Job) -> list[Any]:
    """[first event's ms, [ms after it, id seq, type code, short data (no defaults)], ...]."""
    base = int(job.events[0][0].split("-")[0])
    out: list[Any] = [base]
    for eid, f in job.events:
        ms, seq = (int(x) for x in eid.split("-"))
        short = {FIELD_CODES.get(k, k): v for k, v in data(f).items() if not _is_default(v)}
        out.append([ms - base, seq, TYPE_CODES[f["type"]], *([short] if short else [])])
    return out


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


Writer = Callable[[Any, Job], None]


def write_projection(pipe: Any, job: Job) -> None:
    pipe.hset(job_key(job), mapping=job.projection)
    pipe.pexpire(job_key(job), RETENTION_MS)


def write_state_projection(pipe: Any, job: Job) -> None:
    state = {k: v for k, v in job.projection.items() if k not in REQUEST_FIELDS}
    pipe.hset(job_key(job), mapping=state)
    pipe.pexpire(job_key(job), RETENTION_MS)


def write_stream(pipe: Any, job: Job) -> None:
    for eid, f in job.events:
        pipe.xadd(events_key(job), f, id=eid)
    pipe.pexpire(events_key(job), RETENTION_MS)


def write_list(encode: Callable[[Job], Sequence[Any]]) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        pipe.rpush(events_key(job), *(compact(e) for e in encode(job)))
        pipe.pexpire(events_key(job), RETENTION_MS)

    return write


def write_string(encode: Callable[[Job], Any]) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        pipe.set(events_key(job), compact(encode(job)), px=RETENTION_MS)

    return write


def write_msgpack(pipe: Any, job: Job) -> None:
    pipe.eval(MSGPACK_SET, 1, events_key(job), compact(short_events(job)), RETENTION_MS)


def write_global_copy(pipe: Any, job: Job) -> None:
    for _eid, f in job.events:
        fields = {"type": f["type"], "job_id": job.id, "ts": f["ts"], "v": f["v"]}
        pipe.xadd(KEYS.events, {**fields, "data": f["data"]})


def write_global_reference(pipe: Any, job: Job) -> None:
    for _eid, f in job.events:
        pipe.xadd(KEYS.events, {"job_id": job.id, "type": f["type"]})


def both(*writers: Writer) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        for w in writers:
            w(pipe, job)

    return write


@dataclass(frozen=True)
class Variation:
    group: str
    name: str
    write: Writer
    config: tuple[tuple[str, str], ...] = ()
    url_chars: int | None = None


VARIATIONS = (
    Variation("events", "STREAM per job (today)", write_stream),
    *(
        Variation(
            "events",
            f"STREAM per job, stream-node-max-bytes {n}",
            write_stream,
            (("stream-node-max-bytes", str(n)),),
        )
        for n in (2048, 1024, 512)
    ),
    Variation("events", "LIST of JSON events (full)", write_list(full_events)),
    Variation("events", "LIST of JSON events (short)", write_list(lambda j: short_events(j)[1:])),
    Variation("events", "STRING, JSON array (full)", write_string(full_events)),
    Variation("events", "STRING, JSON, no derivable ts/v", write_string(underivable_events)),
    Variation("events", "STRING, JSON, short names", write_string(short_events)),
    Variation("events", "STRING, MessagePack, short names", write_msgpack),
    Variation("projection", "HASH as stored (today)", write_projection),
    Variation(
        "projection", "HASH forced to hashtable", write_projection, ((HASH_ENTRIES_LIMIT, "0"),)
    ),
    Variation("projection", "HASH, 100-char URL", write_projection, url_chars=100),
    Variation(
        "projection",
        "HASH, 100-char URL, listpack value limit 256",
        write_projection,
        ((HASH_VALUE_LIMIT, "256"),),
        url_chars=100,
    ),
    Variation("projection", "HASH without the request fields", write_state_projection),
    Variation("global stream", "full copy per event (today)", write_global_copy),
    Variation(
        "global stream",
        "full copy per event, stream-node-max-bytes 1024",
        write_global_copy,
        (("stream-node-max-bytes", "1024"),),
    ),
    Variation("global stream", "reference per event (job_id, type)", write_global_reference),
    Variation(
        "settled job",
        "today: HASH + STREAM + global copy",
        both(write_projection, write_stream, write_global_copy),
    ),
    Variation(
        "settled job",
        "today, stream-node-max-bytes 1024",
        both(write_projection, write_stream, write_global_copy),
        (("stream-node-max-bytes", "1024"),),
    ),
    Variation(
        "settled job",
        "HASH + STRING short + global reference",
        both(write_projection, write_string(short_events), write_global_reference),
    ),
    Variation(
        "settled job",
        "HASH without request fields + STRING short + global reference",
        both(write_state_projection, write_string(short_events), write_global_reference),
    ),
    Variation(
        "settled job",
        "STRING short only (projection folded on read) + global reference",
        both(write_string(short_events), write_global_reference),
    ),
)


# -- measuring ---------------------------------------------------------------------------------


def load_samples(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[Job]]:
    return {
        kind: [
            Job(s["job_id"], dict(s["projection"]), [(e[0], dict(e[1])) for e in s["events"]])
            for s in rows
        ]
        for kind, rows in samples.items()
    }


def mix_jobs(samples: dict[str, list[Job]], cycle: Sequence[str], jobs: int) -> list[Job]:
    """`jobs` jobs in the mix's proportions, the samples of each kind taken in turn, each
    under a fresh id of the same length."""
    taken: Counter[str] = Counter()
    out = []
    for i in range(jobs):
        kind = cycle[i % len(cycle)]
        rows = samples[kind]
        job = rows[taken[kind] % len(rows)]
        taken[kind] += 1
        out.append(job.renamed(f"X{i:0{len(job.id) - 1}d}"))
    return out


async def _data_memory(r: StrRedis) -> int:
    """used_memory without the client buffers (ours is the only client)."""
    await asyncio.sleep(0.3)  # lazy frees, incremental rehashing
    info = await r.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


async def _memory_usage(r: StrRedis) -> tuple[int, int, dict[str, int]]:
    total, keys, encodings = 0, 0, Counter[str]()
    cursor = 0
    while True:
        cursor, batch = await r.scan(cursor, count=1000)
        if batch:
            async with r.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.memory_usage(key, samples=0)
                    pipe.object("encoding", key)
                replies = await pipe.execute()
            for i in range(len(batch)):
                total += int(replies[2 * i] or 0)
                encodings[replies[2 * i + 1]] += 1
            keys += len(batch)
        if cursor == 0:
            return total, keys, dict(encodings)


async def measure(r: StrRedis, variation: Variation, jobs: list[Job]) -> dict[str, Any]:
    defaults = {name: (await r.config_get(name))[name] for name, _v in variation.config}
    await r.flushall()
    for name, value in variation.config:
        await r.config_set(name, value)
    if variation.url_chars is not None:
        jobs = [j.with_url(variation.url_chars) for j in jobs]
    before = await _data_memory(r)
    for start in range(0, len(jobs), BATCH):
        async with r.pipeline(transaction=False) as pipe:
            for job in jobs[start : start + BATCH]:
                variation.write(pipe, job)
            await pipe.execute()
    grown = await _data_memory(r) - before
    usage, keys, encodings = await _memory_usage(r)
    for name, value in defaults.items():
        await r.config_set(name, value)
    return {
        "group": variation.group,
        "name": variation.name,
        "config": dict(variation.config),
        "used_memory_per_job": round(grown / len(jobs), 1),
        "memory_usage_per_job": round(usage / len(jobs), 1),
        "keys": keys,
        "encodings": encodings,
    }


async def run(
    executable: str, samples: dict[str, list[dict[str, Any]]], jobs: int, cycle: Sequence[str]
) -> dict[str, Any]:
    """Every variation on a fresh plain redis-server from `executable`."""
    tmp = Path(tempfile.mkdtemp(prefix="encodings-"))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        executable,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)),
        *("--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    r: StrRedis = aioredis.Redis(port=port, decode_responses=True)
    try:
        for _ in range(200):
            try:
                await r.ping()
                break
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{executable} did not answer on port {port}")
        await r.eval(MSGPACK_SET, 1, "warm", "[]", 1)  # the script cache is not per job
        version = (await r.info("server"))["redis_version"]
        allocator = (await r.info("memory"))["mem_allocator"]
        mixed = mix_jobs(load_samples(samples), cycle, jobs)
        results = [await measure(r, v, mixed) for v in VARIATIONS]
    finally:
        await r.aclose()
        proc.terminate()
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "redis_version": version,
        "mem_allocator": allocator,
        "jobs": jobs,
        "retention_ms": RETENTION_MS,
        "variations": results,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"encodings on a plain redis-server {result['redis_version']} "
        f"({result['mem_allocator']}), {result['jobs']} jobs each, bytes per job:",
        f"  {'group':14s} {'variation':66s} {'used_memory':>11s} {'MEM USAGE':>9s}  encodings",
    ]
    for v in result["variations"]:
        enc = ", ".join(f"{e} {n}" for e, n in sorted(v["encodings"].items()))
        lines.append(
            f"  {v['group']:14s} {v['name']:66s} {v['used_memory_per_job']:11.0f} "
            f"{v['memory_usage_per_job']:9.0f}  {enc}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--samples",
        type=Path,
        default=ROOT / "bench" / "results" / "redis_memory.json",
        help="a result of bench/redis_memory.py (its first run's samples are used)",
    )
    parser.add_argument("--redis-server", default=None, metavar="PATH")
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    saved = json.loads(args.samples.read_text())
    samples = saved["runs"][0]["samples"]
    executable = args.redis_server or find_redis_server()
    cycle = saved["kind_cycle"]
    print(report(asyncio.run(run(executable, samples, args.jobs, cycle))))


if __name__ == "__main__":
    main()
