"""Enqueue throughput: POST /download against `downloader api` alone (one process, no processor
or notifier, so only the enqueue path is measured: HTTP + validation + enqueue.lua).

50 concurrent clients on one keep-alive aiohttp session (pool of 50 connections); request
bodies are encoded before the clock starts. A warm-up (not counted) precedes the measured run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Stack, percentile, save_json


def _bodies(n: int, tag: str) -> list[bytes]:
    return [
        json.dumps(
            {
                "aggr_id": f"enqueue-{i % 5}",
                "aggr_limit": 10,
                # Never fetched (no processor runs); port 9 is "discard".
                "url": f"http://127.0.0.1:9/{tag}/{i}.bin",
                "callback_type": "http",
                "callback_dst": "http://127.0.0.1:9/callback",
                "extra": f"{tag}-{i}",
            }
        ).encode()
        for i in range(n)
    ]


async def _fire(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[float], int, float]:
    """POST every body with `concurrency` workers; (latencies in s, errors, wall seconds)."""
    latencies: list[float] = []
    errors = 0
    it = iter(bodies)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker() -> None:
            nonlocal errors
            for body in it:  # shared iterator: each body is sent once; bounded by len(bodies)
                t0 = time.perf_counter()
                try:
                    async with http.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 201
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, errors, wall


async def run(
    requests: int = 20_000, concurrency: int = 50, warmup: int = 1_000, rounds: int = 3
) -> dict[str, Any]:
    """`rounds` measured runs of `requests` each, on one warmed-up api process; the round
    with the median req/s is the headline (the machine's 2 cores are shared and noisy)."""
    results = []
    async with Stack("api") as stack:
        url = stack.base_url + "/download"
        await _fire(url, _bodies(warmup, "warmup"), concurrency)
        for n in range(rounds):
            bodies = _bodies(requests, f"run{n}")
            cpu0, self0 = stack.cpu(), os.times()
            latencies, errors, wall = await _fire(url, bodies, concurrency)
            cpu1, self1 = stack.cpu(), os.times()
            cpu = {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu1}
            client = self1.user + self1.system - self0.user - self0.system
            cpu["client"] = round(client / wall, 2)
            results.append(
                {
                    "errors": errors,
                    "wall_s": round(wall, 3),
                    "req_per_s": round(requests / wall, 1),
                    "latency_ms": {
                        "p50": round(1000 * percentile(latencies, 50), 2),
                        "p99": round(1000 * percentile(latencies, 99), 2),
                        "max": round(1000 * max(latencies), 2),
                    },
                    "cpu_cores_used": cpu,
                }
            )
    median = sorted(results, key=lambda r: float(str(r["req_per_s"])))[len(results) // 2]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "warmup_requests": warmup,
        "rounds": rounds,
        **median,
        "all_rounds_req_per_s": [r["req_per_s"] for r in results],
        "round_details": results,
    }


def report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores_used"].items())
    return (
        f"enqueue: {r['requests']} POST /download, {r['concurrency']} concurrent, "
        f"{r['errors']} errors; median of {r['rounds']} rounds "
        f"(all: {', '.join(f'{x:.0f}' for x in r['all_rounds_req_per_s'])} req/s)\n"
        f"  {r['req_per_s']:.0f} req/s  (wall {r['wall_s']:.2f} s)\n"
        f"  latency p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  max {lat['max']:.1f} ms\n"
        f"  CPU (cores busy during the run): {cpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.requests, args.concurrency, args.warmup, args.rounds))
    print(report(result))
    save_json("enqueue.json", result)


if __name__ == "__main__":
    main()
