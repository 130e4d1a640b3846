"""Redis CPU per job transition: how far one Redis core goes.

Runs each Lua transition of a job's life `--jobs` times, one after another, against a private
redis-server (the embedded one, AOF on as `make run` has it) and reads Redis's own
`INFO commandstats` (usec_per_call of EVALSHA) after each: enqueue, claim (one job), finish
(succeeded), callback_begin, callback_end (delivered), file_deleted (the reaper's record,
which settles the job). `--no-aof` turns the AOF off first, to
show what durability costs. No service process runs; the numbers are Redis's time only.
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--no-aof", action="store_true")
    args = parser.parse_args()
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
