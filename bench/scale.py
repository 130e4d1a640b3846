"""Scale-out: how much faster three processor processes drain a backlog than one.

300 jobs over 30 aggregations (`aggr_limit` 2: up to 60 downloads may run at once), each
processor limited to 8 workers so that one processor is the bottleneck; every answer of the
origin takes 50 ms. The backlog is loaded through the API first; then N processors start, and
the clock runs from the moment all of them are busy (the origin holds every answer until
N x 8 requests wait) to the last `download.succeeded`. Rounds alternate 1 and 3 processors on
a fresh stack each time; the median of each is reported.

    .venv/bin/python bench/scale.py [--rounds 3] [--jobs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, Role, Stack, git_commit

from downloader.storage import Keys
from harness.events import EventTail
from harness.redis_nodes import StrRedis
from harness.scale import GatedOrigin, wait_succeeded

AGGREGATIONS = 30
AGGR_LIMIT = 2
MAX_WORKERS = 8


async def drain(processors: int, jobs: int, origin: GatedOrigin) -> dict[str, float]:
    """One round on a fresh stack: seconds from all processors busy to the last success."""
    patch = {"processor": {"max_workers": MAX_WORKERS}}
    async with Stack("api", patch) as stack, aiohttp.ClientSession() as http:
        origin.arm(open_at=processors * MAX_WORKERS)
        for i in range(jobs):
            aggr = f"scale{i % AGGREGATIONS}"
            body = {
                "aggr_id": aggr,
                "aggr_limit": AGGR_LIMIT,
                "url": origin.url(f"/{aggr}/job{i}"),
                "callback_url": "http://127.0.0.1:9/cb",  # no notifier runs: never called
            }
            async with http.post(stack.base_url + "/download", json=body) as resp:
                assert resp.status == 201, await resp.text()
        keys = Keys("dl")
        r: StrRedis = aioredis.Redis(host="127.0.0.1", port=stack.redis.port, decode_responses=True)
        try:
            tail = EventTail(r, keys)
            tail.last = await tail.last_id()
            config = stack.tmp / "config.json"
            for n in range(processors):
                role = Role("processor", config, stack.tmp / f"processor-{n}.log").start()
                stack.roles[f"processor-{n}"] = role
            succeeded = await wait_succeeded(tail, jobs, timeout_s=300)
            elapsed = time.monotonic() - origin.opened_at
        finally:
            await r.aclose()
        assert len(Counter(succeeded)) == jobs
        assert max(origin.max_inflight.values()) <= AGGR_LIMIT
        return {"seconds": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    origin = await GatedOrigin(latency_s=0.05).start()
    runs: dict[int, list[dict[str, float]]] = {1: [], 3: []}
    try:
        for i in range(args.rounds):
            for n in (1, 3):
                result = await drain(n, args.jobs, origin)
                runs[n].append(result)
                print(f"  round {i + 1}: {n} processor(s): {result['seconds']:.2f} s", flush=True)
    finally:
        await origin.close()
    one = statistics.median(r["seconds"] for r in runs[1])
    three = statistics.median(r["seconds"] for r in runs[3])
    report = {
        "commit": git_commit(),
        "jobs": args.jobs,
        "one_processor_s": one,
        "three_processors_s": three,
        "speed_up": round(one / three, 2),
        "runs": {str(k): v for k, v in runs.items()},
    }
    print(
        f"scale: 1 processor {one:.2f} s, 3 processors {three:.2f} s: "
        f"{report['speed_up']:.2f}x (median of {args.rounds})"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "scale.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
