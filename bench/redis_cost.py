"""Redis CPU per job transition: how far one Redis core goes.

Runs each Lua transition of a job's life `--jobs` times, one after another, against a private
redis-server (the embedded one, AOF on as `make run` has it) and reads Redis's own
`INFO commandstats` (usec_per_call of EVALSHA) after each: enqueue, claim (one job), finish
(succeeded), callback_begin, callback_end (delivered), file_deleted (the reaper's record,
which settles the job). `--no-aof` turns the AOF off first, to
show what durability costs. No service process runs; the numbers are Redis's time only.

`--cluster` runs the same life for jobs of `--aggregations` (30) aggregations on a Redis
Cluster of three masters with a replica each (harness.redis_cluster), the aggregations placed as
the api places them, and reports each master's commands and CPU: the load should spread evenly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import STACKS_DIR, save_json

from downloader.config import Config
from downloader.embedded import EmbeddedRedis
from downloader.ids import new_job_id
from downloader.jobs import ClaimedJob
from downloader.models import parse_download_request
from downloader.storage import Storage, connect
from downloader.vocabulary import CallbackOutcome, DownloadOutcome
from harness.redis_cluster import ClusterGroup
from harness.servers import free_port

SUCCEEDED = {
    "attempt": 1,
    "response_code": 200,
    "download_url": "http://files.test/x",
    "file_mime_type": "text/plain",
    "file_bytes": 10240,
    "image_size": "",
}


async def run(jobs: int = 500, aof: bool = True) -> dict[str, Any]:
    STACKS_DIR.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(Path(tempfile.mkdtemp(dir=STACKS_DIR)), "127.0.0.1", free_port())
    server.start()
    try:
        config = Config.model_validate({"redis": {"addr": server.addr}})
        storage = Storage(connect(config), config)
        r = storage.r
        if not aof:
            await r.config_set("appendonly", "no")
        request = parse_download_request(
            {
                "aggr_id": "cost",
                "aggr_limit": jobs,
                "url": "http://origin.test/file.bin",
                "callback_url": "http://receiver.test/cb",
                "extra": "x" * 50,
            }
        )
        fields = request.job_fields(2)
        shard = await storage.shard_for("cost")
        await storage.enqueue(new_job_id(shard), fields)  # loads the scripts
        ids = [new_job_id(shard) for _ in range(jobs)]
        claimed: list[ClaimedJob] = []

        async def claim(_i: int) -> None:
            claimed.extend((await storage.claim(shard, "cost", "bench", 600_000, 1)).jobs)

        steps: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
            ("enqueue", lambda i: storage.enqueue(ids[i], fields)),
            ("claim", claim),
            (
                "finish",
                lambda i: storage.finish(
                    claimed[i].id, claimed[i].lease, DownloadOutcome.SUCCEEDED, SUCCEEDED
                ),
            ),
            ("callback_begin", lambda i: storage.callback_begin(claimed[i].id)),
            (
                "callback_end",
                lambda i: storage.callback_end(
                    claimed[i].id, CallbackOutcome.DELIVERED, {"attempt": 1}, "0-1", 0
                ),
            ),
            ("file_deleted", lambda i: storage.reap_done(claimed[i].id)),  # settles the job
        ]
        usec: dict[str, float] = {}
        for name, step in steps:
            await r.config_resetstat()
            for i in range(jobs):
                await step(i)
            usec[name] = float((await r.info("commandstats"))["cmdstat_evalsha"]["usec_per_call"])
        await storage.close()
    finally:
        server.stop()
    per_job = sum(usec.values())
    return {
        "jobs": jobs,
        "aof": aof,
        "usec_per_call": usec,
        "usec_per_job": round(per_job, 1),
        "jobs_per_redis_core_s": round(1e6 / per_job),
    }


async def run_cluster(jobs: int = 3000, aggregations: int = 30) -> dict[str, Any]:
    """The job life of `run` on a cluster, `jobs` spread round robin over `aggregations`,
    batches of 100 at a time; per master: commands, EVALSHA calls and Redis CPU seconds."""
    async with ClusterGroup() as cluster, contextlib.AsyncExitStack() as closing:
        config = Config.model_validate({"redis": {"addr": cluster.addr, "cluster": True}})
        storage = Storage(connect(config), config)
        closing.push_async_callback(storage.close)  # before the cluster stops, failed or not
        names = [f"cost{a}" for a in range(aggregations)]
        shards: dict[str, int] = {}
        for aggr in names:  # one after another, as new aggregations arrive at the api
            shards[aggr] = await storage.shard_for(aggr)
            await storage.enqueue(new_job_id(shards[aggr]), _fields(aggr, jobs))
        of_job = [names[i % aggregations] for i in range(jobs)]
        ids = [new_job_id(shards[a]) for a in of_job]
        claimed: list[ClaimedJob] = []

        async def claim(i: int) -> None:
            claimed.extend(
                (await storage.claim(shards[of_job[i]], of_job[i], "bench", 600_000, 1)).jobs
            )

        steps: list[Callable[[int], Awaitable[Any]]] = [
            lambda i: storage.enqueue(ids[i], _fields(of_job[i], jobs)),
            claim,
            lambda i: storage.finish(
                claimed[i].id, claimed[i].lease, DownloadOutcome.SUCCEEDED, SUCCEEDED
            ),
            lambda i: storage.callback_begin(claimed[i].id),
            lambda i: storage.callback_end(
                claimed[i].id, CallbackOutcome.DELIVERED, {"attempt": 1}, "0-1", 0
            ),
            lambda i: storage.reap_done(claimed[i].id),
        ]
        masters = cluster.masters
        for m in masters:
            async with m.admin() as r:
                await r.config_resetstat()
        cpu0 = [await _cpu_seconds(m) for m in masters]
        for step in steps:
            for start in range(0, jobs, 100):
                await asyncio.gather(*(step(i) for i in range(start, min(jobs, start + 100))))
        per_master = []
        for m, before in zip(masters, cpu0, strict=True):
            async with m.admin() as r:
                stats = await r.info("commandstats")
            evalsha = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
            per_master.append(
                {
                    "node": m.addr,
                    "shards": sorted(
                        s
                        for s in storage.all_shards
                        if storage.r.get_node_from_key(storage.keys.events(s)).name == m.addr
                    ),
                    "aggregations": sum(
                        storage.r.get_node_from_key(storage.keys.events(shards[a])).name == m.addr
                        for a in names
                    ),
                    "commands": sum(int(v["calls"]) for v in stats.values()),
                    "evalsha_calls": int(evalsha["calls"]),
                    "evalsha_usec": int(evalsha["usec"]),
                    "cpu_s": round(await _cpu_seconds(m) - before, 3),
                }
            )

    def spread(key: str) -> float:
        values = [float(m[key]) for m in per_master]
        return round(max(values) / min(values) - 1, 3) if min(values) else float("inf")

    return {
        "jobs": jobs,
        "aggregations": aggregations,
        "masters": per_master,
        "spread": {k: spread(k) for k in ("commands", "evalsha_calls", "evalsha_usec", "cpu_s")},
    }


def _fields(aggr: str, limit: int) -> dict[str, Any]:
    return parse_download_request(
        {
            "aggr_id": aggr,
            "aggr_limit": limit,
            "url": "http://origin.test/file.bin",
            "callback_url": "http://receiver.test/cb",
            "extra": "x" * 50,
        }
    ).job_fields(2)


async def _cpu_seconds(member: Any) -> float:
    async with member.admin() as r:
        cpu = await r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--no-aof", action="store_true")
    parser.add_argument("--cluster", action="store_true", help="on a 3-master Redis Cluster")
    parser.add_argument("--aggregations", type=int, default=30, help="with --cluster")
    args = parser.parse_args()
    if args.cluster:
        report = asyncio.run(run_cluster(args.jobs, args.aggregations))
        for m in report["masters"]:
            print(
                f"  {m['node']}: {m['aggregations']:3d} aggregations, {len(m['shards'])} shards, "
                f"{m['commands']:7d} commands, {m['evalsha_calls']:7d} EVALSHA "
                f"({m['evalsha_usec'] / 1e6:.2f} s), {m['cpu_s']:.2f} s CPU"
            )
        print("redis_cost --cluster: max/min - 1 across masters:", report["spread"])
        save_json("redis_cost_cluster.json", report)
        return
    result = asyncio.run(run(args.jobs, not args.no_aof))
    for name, us in result["usec_per_call"].items():
        print(f"  {name:15s} {us:6.1f} us")
    print(
        f"redis_cost (AOF {'on' if result['aof'] else 'off'}): {result['usec_per_job']} us of "
        f"Redis CPU per job, i.e. one Redis core carries ~{result['jobs_per_redis_core_s']} jobs/s"
    )
    save_json("redis_cost.json", result)


if __name__ == "__main__":
    main()
