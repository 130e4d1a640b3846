"""Callbacks per second, Kafka vs HTTP: one notifier drains a backlog of finished downloads.

For each backend and notifier concurrency, on a fresh Redis: api + processor finish `jobs`
downloads (10 KB bodies from the local origin) while no notifier runs, the processor is
stopped, then one `downloader notifier` process starts and delivers the backlog:

  - kafka: produced to a fresh one-partition topic of a local Apache Kafka broker (the test
    harness's single-node KRaft broker, or $KAFKA_BOOTSTRAP_SERVERS), delivered when the
    broker's delivery report arrives (acks=all, idempotent producer, linger.ms 5: the
    backend's defaults);
  - http: POSTed to a local aiohttp receiver (the peers process of bench/common.py).

Measured from the notifier's point of view, on its own events: the drain is the time from
the first `callback.attempted` to the last `callback.delivered` (Redis TIME, ms); the rate is
jobs / drain. Also the wall time from spawning the notifier to the last delivery (includes its
~1 s start-up) and the CPU seconds the notifier process and redis-server used meanwhile.
Every callback is checked to have arrived (topic high watermark, receiver count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    Peers,
    Role,
    bench_config,
    busy_cores,
    cpu_seconds,
    cpu_ticks,
    merge,
    save_json,
)

from downloader.embedded import EmbeddedRedis  # common put the repository on sys.path
from downloader.storage import Keys
from harness.events import EventTail
from harness.kafka_broker import (
    KafkaBroker,
    create_topic,
    external_bootstrap,
    kafka_available,
)
from harness.net import free_port
from harness.redis_nodes import StrRedis
from harness.servers import wait_http

JOBS = 2000
CONCURRENCY = (10, 50)  # notifier.concurrency: the default, and the production config's
BACKENDS = ("kafka", "http")
AGGREGATIONS = 10
POST_CLIENTS = 50


async def _submit(base_url: str, bodies: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    it = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=POST_CLIENTS)) as http:

        async def worker() -> None:
            for body in it:  # shared iterator
                async with http.post(f"{base_url}/download", json=body) as r:
                    data = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"POST /download: {r.status} {data}")
                    ids.append(data["id"])

        await asyncio.gather(*(worker() for _ in range(POST_CLIENTS)))
    return ids


async def _events_until(tail: EventTail, etype: str, count: int, timeout_s: float) -> None:
    """Follow every shard's events until `count` of type `etype` were seen."""
    try:
        await tail.wait(lambda t: t.count(etype) >= count, timeout_s)
    except TimeoutError:
        raise TimeoutError(
            f"only {tail.count(etype)}/{count} {etype} events in {timeout_s} s"
        ) from None


def _topic_messages(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        consumer.close()


async def drain(
    backend: str,
    jobs: int,
    concurrency: int,
    peers: Peers,
    bootstrap: str,
    kafka_props: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One measurement: a backlog of `jobs` finished downloads, drained by one notifier."""
    tmp = Path(tempfile.mkdtemp(prefix=f"dl-bench-cb-{backend}-"))
    redis_server = EmbeddedRedis(tmp / "redis", "127.0.0.1", free_port())
    redis_server.start()
    roles: list[Role] = []
    try:
        config = merge(
            bench_config(redis_server.addr, tmp),
            {
                "backends": {"kafka": {"bootstrap.servers": bootstrap, **(kafka_props or {})}},
                "notifier": {"concurrency": concurrency},
            },
        )
        path = tmp / "config.json"
        path.write_text(json.dumps(config, indent=2))
        port = free_port()
        roles.append(Role("api", path, tmp / "api.log", port).start())
        processor = Role("processor", path, tmp / "processor.log").start()
        roles.append(processor)
        base_url = f"http://127.0.0.1:{port}"
        await wait_http(f"{base_url}/hb")

        topic = f"bench-callbacks-{uuid.uuid4().hex[:8]}"
        if backend == "kafka":
            await asyncio.to_thread(create_topic, bootstrap, topic)
            dst = {"callback_type": "kafka", "callback_dst": topic}
        else:
            dst = {"callback_type": "http", "callback_dst": peers.callback_url(topic)}
        bodies = [
            {
                "aggr_id": f"cb-{i % AGGREGATIONS}",
                "aggr_limit": 20,
                "url": peers.origin_url(f"ok/{topic}-{i}.bin"),
                "extra": f"x{i}",
                **dst,
            }
            for i in range(jobs)
        ]
        keys = Keys(config["redis"].get("key_prefix", "dl"), config["redis"].get("shards", 16))
        r: StrRedis = aioredis.Redis(
            host="127.0.0.1", port=redis_server.port, decode_responses=True
        )
        try:
            ids = await _submit(base_url, bodies)
            await _events_until(EventTail(r, keys), "download.succeeded", jobs, 300)
            processor.stop()  # the backlog is complete: the notifier has the machine to itself
            tail = EventTail(r, keys)
            tail.last = await tail.last_id()

            redis_cpu0 = cpu_seconds(redis_server.proc.pid) if redis_server.proc else 0.0
            ticks0 = cpu_ticks()
            spawned = time.monotonic()
            notifier = Role("notifier", path, tmp / "notifier.log").start()
            roles.append(notifier)
            await _events_until(tail, "callback.delivered", jobs, 300)
            wall_s = time.monotonic() - spawned
            notifier_cpu = cpu_seconds(notifier.pid)
            redis_cpu = (cpu_seconds(redis_server.proc.pid) if redis_server.proc else 0.0) - (
                redis_cpu0
            )
            ticks1 = cpu_ticks()
        finally:
            await r.aclose()

        events = [(t, ms) for job in tail.jobs.values() for t, _d, ms in job]
        attempted = [ms for t, ms in events if t == "callback.attempted"]
        delivered = [ms for t, ms in events if t == "callback.delivered"]
        failed_attempts = sum(t == "callback.retry_scheduled" for t, _ms in events)
        drain_s = (max(delivered) - min(attempted)) / 1000
        if backend == "kafka":
            arrived = await asyncio.to_thread(_topic_messages, bootstrap, topic)
        else:
            arrived = sum(
                1
                for rec in await peers.wait_callbacks(jobs, timeout_s=30)
                if rec["job_id"] in set(ids)
            )
        return {
            "backend": backend,
            "kafka_props": (kafka_props or {}) if backend == "kafka" else {},
            "concurrency": concurrency,
            "jobs": jobs,
            "delivered_events": len(delivered),
            "arrived": arrived,
            "failed_attempts": failed_attempts,
            "drain_s": round(drain_s, 3),
            "callbacks_per_s": round(jobs / drain_s, 1),
            "wall_from_spawn_s": round(wall_s, 3),
            "notifier_cpu_s": round(notifier_cpu, 2),
            "notifier_cpu_ms_per_callback": round(1000 * notifier_cpu / jobs, 3),
            "redis_cpu_s": round(redis_cpu, 2),
            "machine_busy_cores": busy_cores(ticks0, ticks1)["busy_cores"],
        }
    finally:
        for role in reversed(roles):
            role.stop()
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def run(
    jobs: int = JOBS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    rounds: int = 1,
    backends: tuple[str, ...] = BACKENDS,
    kafka_props: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every (concurrency, backend) pair `rounds` times; the median round by rate is kept."""
    broker: KafkaBroker | None = None
    bootstrap = external_bootstrap()
    if "kafka" in backends and bootstrap is None:
        ok, why = kafka_available()
        if not ok:
            raise SystemExit(f"bench/callbacks.py needs a Kafka broker: {why}")
        broker = KafkaBroker(auto_create_topics=False)
        await asyncio.to_thread(broker.start)
        bootstrap = broker.bootstrap_servers
    results: list[dict[str, Any]] = []
    try:
        async with Peers() as peers:
            for conc in concurrency:
                for backend in backends:
                    tries = []
                    for _ in range(rounds):
                        await peers.reset()
                        tries.append(
                            await drain(backend, jobs, conc, peers, bootstrap or "", kafka_props)
                        )
                        t = tries[-1]
                        print(
                            f"  {backend:5} concurrency {conc:3}: {t['callbacks_per_s']:7.0f}/s"
                            f" (drain {t['drain_s']:.2f} s, notifier CPU"
                            f" {t['notifier_cpu_ms_per_callback']:.2f} ms/callback)",
                            flush=True,
                        )
                    tries.sort(key=lambda t: t["callbacks_per_s"])
                    results.append({**tries[len(tries) // 2], "rounds": len(tries)})
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.close)
    return {"jobs": jobs, "results": results, "load_avg_after": os.getloadavg()}


def report(out: dict[str, Any]) -> str:
    lines = [
        f"Callbacks delivered per second by one notifier draining {out['jobs']} finished jobs",
        "| backend | notifier.concurrency | callbacks/s | drain | notifier CPU per callback"
        " | redis CPU | all arrived |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in out["results"]:
        complete = r["arrived"] >= r["jobs"] and r["delivered_events"] == r["jobs"]
        lines.append(
            f"| {r['backend']} | {r['concurrency']} | {r['callbacks_per_s']:.0f} |"
            f" {r['drain_s']:.2f} s | {r['notifier_cpu_ms_per_callback']:.2f} ms |"
            f" {r['redis_cpu_s']:.1f} s | {'yes' if complete else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated notifier.concurrency values",
    )
    parser.add_argument("--rounds", type=int, default=1, help="median of this many rounds")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--kafka-props",
        type=json.loads,
        default={},
        help="extra backends.kafka properties as JSON, e.g. '{\"linger.ms\": 0}'",
    )
    args = parser.parse_args()
    out = asyncio.run(
        run(
            args.jobs,
            tuple(int(c) for c in args.concurrency.split(",")),
            args.rounds,
            tuple(b for b in args.backends.split(",") if b),
            args.kafka_props,
        )
    )
    print(report(out))
    print(f"results: {save_json('callbacks.json', out)}")


if __name__ == "__main__":
    main()
