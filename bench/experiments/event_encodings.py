"""Bytes per settled job in other encodings, replayed from jobs the service really stored.

Not the service: a plain redis-server (no AOF) and the settled jobs that bench/redis_memory.py
saves (`samples`: each job's packed string `done:<id>`, the shard stream's entries of its
events, its job index score and its idempotency key). For each variation, `jobs` jobs are
written in that encoding (the samples cycled in the proportions of the load mix; each job gets
a fresh id of the same length, spread over the 16 shards, in its key names and in its values),
every per-job key with the TTL the service gives it (retention for the packed job, 24 h for the
idempotency key). Bytes per job = growth of used_memory (less client buffers) / jobs, and the
sum of `MEMORY USAGE <key> SAMPLES 0` over the keyspace / jobs. Between variations: FLUSHALL and
the server's default settings back.

Variations (the first of each group is what the service stored before this work; "today" marks
what it stores now):
  packed job: the STRING of whole lines (`{sealed}\n<id>\t<type>\t<data JSON>` lines); every
    event's data as compact JSON (processor and notifier events are written with `", "` and
    `": "`); what is empty or default left out of the data (`aggr_proxy ""`, `mime_type ""`,
    `request_headers {}`, ...); event ids after the first as ms after the one before (`+6`,
    `+0-1`); one-letter event types; those two, as the service packs today; all four
    ("short"); short, plus short data keys and without the
    `download_url` (derivable from the id); short as MessagePack (Lua's cmsgpack, so a script
    could write it).
  job index: the ZSET per shard (id -> creation ms), a STREAM per shard of job ids.
  idempotency: the HASH (job_id, 64-hex fingerprint); a STRING `<job id><fingerprint>`; the
    same with a 128-bit fingerprint (22 base64 characters).
  shard stream: a copy of each event (j, t, d), a reference (j, t), a reference with a type code.
  settled job: today's packed job + index entry, with and without its events in the shard stream
    (its first hour); candidates built from the cheaper pieces.

    .venv/bin/python bench/experiments/event_encodings.py [--redis-server PATH] [--jobs 10000]
        [--samples bench/results/redis_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository for harness/downloader
    sys.path.insert(0, str(ROOT))

from downloader.config import ApiConfig, EventsConfig, RedisConfig  # noqa: E402
from downloader.embedded import find_redis_server  # noqa: E402
from downloader.events import PACKED_TYPE_CODES, unpack_lines  # noqa: E402
from downloader.ids import ALPHABET, shard_of  # noqa: E402
from downloader.storage import Keys  # noqa: E402
from harness.redis_nodes import StrRedis  # noqa: E402
from harness.servers import free_port  # noqa: E402

RETENTION_MS = int(EventsConfig().retention_hours * 3_600_000)
IDEMPOTENCY_MS = int(ApiConfig().idempotency_window_seconds * 1000)
SHARDS = RedisConfig().shards
KEYS = Keys(RedisConfig().key_prefix, SHARDS)
BATCH = 200  # jobs per pipeline

TYPE_CODES = {str(t): c for t, c in PACKED_TYPE_CODES.items()}  # as the service packs
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
MSGPACK_SET = (
    "return redis.call('SET', KEYS[1], cmsgpack.pack(cjson.decode(ARGV[1])), 'PX', ARGV[2])"
)


@dataclass(frozen=True)
class Line:
    """One event of a packed job."""

    id: str  # <ms>-<seq>
    type: str
    data: str  # JSON, as stored


@dataclass(frozen=True)
class Job:
    """One settled job as the service stored it."""

    id: str
    head: str  # the packed string's first line: the sealed fields (JSON)
    lines: tuple[Line, ...]
    stream: tuple[tuple[str, dict[str, str]], ...]  # the shard stream's entries (j, t, d)
    index_score: float
    idempotency_key: str  # the client's key (as in the key name), '' for none
    idempotency: dict[str, str]  # job_id, fingerprint

    @classmethod
    def from_sample(cls, s: dict[str, Any]) -> Job:
        head = s["packed"].split("\n", 1)[0]  # lines whole again, however they were packed
        lines = tuple(Line(*row.split("\t", 2)) for row in unpack_lines(s["packed"]))
        idem_name = s["idempotency_key"].split(":idem:", 1)[1] if s["idempotency_key"] else ""
        return cls(
            s["job_id"],
            head,
            lines,
            tuple((e[0], dict(e[1])) for e in s["stream"]),
            float(s["index_score"]),
            idem_name,
            dict(s["idempotency"]),
        )

    def renamed(self, new_id: str, idempotency_key: str) -> Job:
        """The same job under another id (of the same length), in its values too."""

        def sub(v: str) -> str:
            return v.replace(self.id, new_id)

        return replace(
            self,
            id=new_id,
            lines=tuple(replace(line, data=sub(line.data)) for line in self.lines),
            stream=tuple((eid, {k: sub(v) for k, v in f.items()}) for eid, f in self.stream),
            idempotency_key=idempotency_key if self.idempotency_key else "",
            idempotency={k: sub(v) for k, v in self.idempotency.items()},
        )

    @property
    def shard(self) -> int:
        return shard_of(self.id)

    @property
    def packed(self) -> str:
        return "\n".join([self.head, *(f"{x.id}\t{x.type}\t{x.data}" for x in self.lines)])


# -- the encodings -----------------------------------------------------------------------------


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _is_default(v: Any) -> bool:
    return v is not True and v in ("", 0, False, {}, [], None)


def _relative_id(event_id: str, prev_ms: int) -> str:
    ms, seq = event_id.split("-")
    return f"+{int(ms) - prev_ms}" + (f"-{seq}" if seq != "0" else "")


@dataclass(frozen=True)
class Packing:
    """How a packed job's lines are written."""

    compact_data: bool = False
    no_defaults: bool = False
    relative_ids: bool = False
    type_codes: bool = False
    field_codes: bool = False
    no_download_url: bool = False

    def data(self, line: Line) -> str:
        if not (self.compact_data or self.no_defaults or self.field_codes or self.no_download_url):
            return line.data
        d = json.loads(line.data)
        if self.no_defaults:
            d = {k: v for k, v in d.items() if not _is_default(v)}
        if self.no_download_url:
            d.pop("download_url", None)
        if self.field_codes:
            d = {FIELD_CODES.get(k, k): v for k, v in d.items()}
        return compact(d)

    def lines(self, job: Job) -> list[str]:
        prev_ms = int(job.lines[0].id.split("-")[0])
        out = []
        for i, line in enumerate(job.lines):
            eid = _relative_id(line.id, prev_ms) if self.relative_ids and i else line.id
            prev_ms = int(line.id.split("-")[0])
            etype = TYPE_CODES[line.type] if self.type_codes else line.type
            out.append(f"{eid}\t{etype}\t{self.data(line)}")
        return out

    def string(self, job: Job) -> str:
        return "\n".join([job.head, *self.lines(job)])

    def msgpack_doc(self, job: Job) -> list[Any]:
        """[head, [id, type, data], ...] with data as a JSON value (for cmsgpack)."""
        rows: list[Any] = [json.loads(job.head)]
        for text in self.lines(job):
            eid, etype, data = text.split("\t", 2)
            rows.append([eid, etype, json.loads(data)])
        return rows


WHOLE = Packing()  # before: lines as they are live
AS_STORED = Packing(relative_ids=True, type_codes=True)  # prelude.lua's pack_line
SHORT = Packing(compact_data=True, no_defaults=True, relative_ids=True, type_codes=True)
SHORTEST = replace(SHORT, field_codes=True, no_download_url=True)

Writer = Callable[[Any, Job], None]


def write_packed(packing: Packing) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        pipe.set(KEYS.done(job.id), packing.string(job), px=RETENTION_MS)

    return write


def write_msgpack(packing: Packing) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        doc = compact(packing.msgpack_doc(job))
        pipe.eval(MSGPACK_SET, 1, KEYS.done(job.id), doc, RETENTION_MS)

    return write


def write_index_zset(pipe: Any, job: Job) -> None:
    pipe.zadd(KEYS.jobs(job.shard), {job.id: job.index_score})


def write_index_stream(pipe: Any, job: Job) -> None:
    pipe.xadd(KEYS.jobs(job.shard), {"j": job.id})


def _fingerprint_128(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)[:16]).decode().rstrip("=")


def write_idem_hash(pipe: Any, job: Job) -> None:
    if job.idempotency_key:
        key = KEYS.idempotency(job.shard, job.idempotency_key)
        pipe.hset(key, mapping=job.idempotency)
        pipe.pexpire(key, IDEMPOTENCY_MS)


def write_idem_string(short: bool) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        if job.idempotency_key:
            fp = job.idempotency["fingerprint"]
            value = job.id + (_fingerprint_128(fp) if short else fp)
            key = KEYS.idempotency(job.shard, job.idempotency_key)
            pipe.set(key, value, px=IDEMPOTENCY_MS)

    return write


def write_stream_copy(pipe: Any, job: Job) -> None:
    for _eid, fields in job.stream:
        pipe.xadd(KEYS.events(job.shard), fields)


def write_stream_reference(type_codes: bool) -> Writer:
    def write(pipe: Any, job: Job) -> None:
        for _eid, f in job.stream:
            etype = TYPE_CODES[f["t"]] if type_codes else f["t"]
            pipe.xadd(KEYS.events(job.shard), {"j": f["j"], "t": etype})

    return write


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


VARIATIONS = (
    Variation("packed job", "STRING of whole lines (before)", write_packed(WHOLE)),
    Variation("packed job", "data as compact JSON", write_packed(Packing(compact_data=True))),
    Variation(
        "packed job",
        "data compact, empty/default values left out",
        write_packed(Packing(compact_data=True, no_defaults=True)),
    ),
    Variation(
        "packed job",
        "event ids as ms after the one before",
        write_packed(Packing(relative_ids=True)),
    ),
    Variation("packed job", "one-letter event types", write_packed(Packing(type_codes=True))),
    Variation("packed job", "ids + types short: as stored (today)", write_packed(AS_STORED)),
    Variation("packed job", "short (all four above)", write_packed(SHORT)),
    Variation("packed job", "short + short data keys, no download_url", write_packed(SHORTEST)),
    Variation("packed job", "short, MessagePack", write_msgpack(SHORT)),
    Variation("job index", "ZSET per shard (today)", write_index_zset),
    Variation("job index", "STREAM per shard of job ids", write_index_stream),
    Variation("idempotency", "HASH job_id, fingerprint (today)", write_idem_hash),
    Variation("idempotency", "STRING id + 64-hex fingerprint", write_idem_string(False)),
    Variation("idempotency", "STRING id + 128-bit fingerprint", write_idem_string(True)),
    Variation("shard stream", "copy per event: j, t, d (today)", write_stream_copy),
    Variation("shard stream", "reference per event: j, t", write_stream_reference(False)),
    Variation("shard stream", "reference, type code", write_stream_reference(True)),
    Variation(
        "settled job",
        "today: packed + index ZSET (past the stream window)",
        both(write_packed(AS_STORED), write_index_zset),
    ),
    Variation(
        "settled job",
        "today in its first hour: + stream copies",
        both(write_packed(AS_STORED), write_index_zset, write_stream_copy),
    ),
    Variation(
        "settled job",
        "short packed + index ZSET",
        both(write_packed(SHORT), write_index_zset),
    ),
    Variation(
        "settled job",
        "short packed + index STREAM",
        both(write_packed(SHORT), write_index_stream),
    ),
    Variation(
        "settled job",
        "short packed + index STREAM + stream references (first hour)",
        both(write_packed(SHORT), write_index_stream, write_stream_reference(True)),
    ),
)


# -- measuring ---------------------------------------------------------------------------------


def load_samples(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[Job]]:
    return {kind: [Job.from_sample(s) for s in rows] for kind, rows in samples.items()}


def mix_jobs(samples: dict[str, list[Job]], cycle: Sequence[str], jobs: int) -> list[Job]:
    """`jobs` jobs in the mix's proportions, the samples of each kind taken in turn, each
    under a fresh id of the same length (its last character its shard, round robin) and a
    fresh idempotency key of the same length."""
    taken: Counter[str] = Counter()
    out = []
    for i in range(jobs):
        kind = cycle[i % len(cycle)]
        rows = samples[kind]
        job = rows[taken[kind] % len(rows)]
        taken[kind] += 1
        new_id = f"X{i:0{len(job.id) - 2}d}{ALPHABET[i % SHARDS]}"
        idem = f"k{i:0{max(1, len(job.idempotency_key) - 1)}d}"
        out.append(job.renamed(new_id, idem))
    return out


async def _data_memory(r: StrRedis) -> int:
    """used_memory without the client buffers (ours is the only client)."""
    await asyncio.sleep(0.3)  # lazy frees, incremental rehashing
    info = await r.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


async def memory_usage_by_key(r: StrRedis) -> AsyncIterator[tuple[str, int, str]]:
    """(key, MEMORY USAGE SAMPLES 0, OBJECT ENCODING) of every key, over a SCAN (a key gone
    between the SCAN and its MEMORY USAGE is left out). bench/redis_memory.py uses it too."""
    cursor = 0
    while True:
        cursor, batch = await r.scan(cursor, count=1000)
        if batch:
            async with r.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.memory_usage(key, samples=0)
                    pipe.object("encoding", key)
                replies = await pipe.execute()
            for i, key in enumerate(batch):
                if replies[2 * i] is not None:
                    yield key, int(replies[2 * i]), replies[2 * i + 1]
        if cursor == 0:
            return


async def _memory_usage(r: StrRedis) -> tuple[int, int, dict[str, int]]:
    total, keys, encodings = 0, 0, Counter[str]()
    async for _key, usage, encoding in memory_usage_by_key(r):
        total, keys = total + usage, keys + 1
        encodings[encoding] += 1
    return total, keys, dict(encodings)


async def measure(r: StrRedis, variation: Variation, jobs: list[Job]) -> dict[str, Any]:
    defaults = {name: (await r.config_get(name))[name] for name, _v in variation.config}
    await r.flushall()
    for name, value in variation.config:
        await r.config_set(name, value)
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
        "idempotency_ms": IDEMPOTENCY_MS,
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
