"""One 1 GiB download: the service against curl, and the processor's memory while it runs.

The origin (the peers process) serves a 1 GiB file of random bytes from disk with
web.FileResponse, i.e. sendfile; the file is written once under .cache/bench/ and reused (after
the first read it sits in the page cache, for curl and the service alike). The service runs as
three processes (api, processor, notifier) so the processor's RSS is its own.

Runs alternate curl / service, `runs` times each, after one unmeasured warm-up fetch:
  - curl: `curl -s -o <storage_dir>/curl-N.bin URL`, timed around the whole command;
  - service: POST /download, then (a) POST -> callback arrival, (b) the job's download.started
    -> download.succeeded event timestamps (Redis ms) from GET /jobs/{id}/events;
  - processor RSS: /proc/<pid>/status VmRSS sampled every 50 ms from just before the POST to
    the callback (growth = peak sample - sample before the POST), and VmHWM before/after.
Both write to the same directory (the processor's storage_dir) on the same disk; before each
run, `sync` and a 1 s pause so no writeback of the previous run overlaps it. MB = 10^6
bytes. The ratio uses the best run of each side (medians are printed too). Targets: service
>= 0.9x curl, RSS growth < 30 MB. Every downloaded copy is deleted right after its run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    Peers,
    RssSampler,
    Stack,
    big_file,
    cpu_user_sys,
    save_json,
    vm_kib,
)

SIZE = 1 << 30
TARGET_RATIO = 0.9
TARGET_RSS_MB = 30.0


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], timeout=120).returncode == 0


def _curl(url: str, dest: Path) -> tuple[float, float, float]:
    """(seconds, curl's user CPU s, curl's system CPU s)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["curl", "-s", "-o", str(dest), url], check=True, timeout=300)
    seconds = time.perf_counter() - start
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime


async def _settle() -> None:
    """Start every run from the same state: no writeback of an earlier run still going."""
    await asyncio.to_thread(os.sync)
    await asyncio.sleep(1)


async def _service_once(
    stack: Stack, peers: Peers, http: aiohttp.ClientSession, url: str, n: int, origin: Path
) -> dict[str, Any]:
    pid = stack.roles["processor"].pid
    hwm0 = vm_kib(pid, "VmHWM")
    rss = RssSampler(pid, 0.05).start()
    await asyncio.sleep(0.2)  # a few samples of the idle process first
    await peers.reset()
    body = {
        "aggr_id": f"big-{n}",
        "aggr_limit": 1,
        "url": url,
        "callback_type": "http",
        "callback_dst": peers.callback_url(f"big{n}"),
        "max_retries": 0,
    }
    idle_kib = max(rss.samples)
    cpu0, peers0 = cpu_user_sys(pid), peers.cpu()
    t_post = time.monotonic()
    async with http.post(stack.base_url + "/download", json=body) as r:
        data = await r.json()
        if r.status != 201:
            raise RuntimeError(f"POST /download: {r.status} {data}")
    job_id = data["id"]
    receipts = await peers.wait_callbacks(1, timeout_s=300)
    cpu1, peers1 = cpu_user_sys(pid), peers.cpu()
    await rss.stop()
    hwm1 = vm_kib(pid, "VmHWM")
    if not receipts or not receipts[0]["success"]:
        raise RuntimeError(f"the big download failed: {receipts}")
    t_cb = receipts[0]["t"]
    async with http.get(f"{stack.base_url}/jobs/{job_id}/events") as r:
        events = {e["type"]: e for e in (await r.json())["events"]}
    ts = {
        k: datetime.fromisoformat(events[k]["ts"].replace("Z", "+00:00")).timestamp()
        for k in ("download.started", "download.succeeded")
    }
    size = int(events["download.succeeded"]["data"]["file_bytes"])
    path = stack.storage_dir / job_id[:3] / job_id
    on_disk = path.stat().st_size
    identical = _same_file(path, origin)
    path.unlink()
    events_s = ts["download.succeeded"] - ts["download.started"]
    return {
        "bytes": size,
        "bytes_on_disk": on_disk,
        "identical": identical,
        "post_to_callback_s": round(t_cb - t_post, 3),
        "started_to_succeeded_s": round(events_s, 3),
        "mbps_post_to_callback": _mbps(size, t_cb - t_post),
        "mbps_events": _mbps(size, events_s),
        "processor_cpu_user_s": round(cpu1[0] - cpu0[0], 2),
        "processor_cpu_sys_s": round(cpu1[1] - cpu0[1], 2),
        "origin_cpu_s": round(peers1 - peers0, 2),
        "rss_idle_mb": round(idle_kib / 1024, 1),
        "rss_peak_mb": round(rss.peak_kib / 1024, 1),
        "rss_growth_mb": round((rss.peak_kib - idle_kib) / 1024, 1),
        "rss_samples": len(rss.samples),
        "vmhwm_before_mb": round(hwm0 / 1024, 1),
        "vmhwm_after_mb": round(hwm1 / 1024, 1),
    }


async def run(runs: int = 3) -> dict[str, Any]:
    origin = big_file(SIZE)
    curl_runs: list[dict[str, Any]] = []
    svc_runs: list[dict[str, Any]] = []
    async with (
        Peers(big_file=origin) as peers,
        Stack("split") as stack,
        aiohttp.ClientSession() as http,
    ):
        url = peers.origin_url("big/1gib.bin")
        warm, _u, _s = _curl(url, Path("/dev/null"))
        for n in range(runs):
            await _settle()
            dest = stack.storage_dir / f"curl-{n}.bin"
            seconds, user, system = _curl(url, dest)
            curl_runs.append(
                {
                    "seconds": round(seconds, 3),
                    "cpu_user_s": round(user, 2),
                    "cpu_sys_s": round(system, 2),
                    "mbps": _mbps(dest.stat().st_size, seconds),
                    "bytes": dest.stat().st_size,
                }
            )
            dest.unlink()
            await _settle()
            svc_runs.append(await _service_once(stack, peers, http, url, n, origin))
    curl_best = max(r["mbps"] for r in curl_runs)
    ev_best = max(r["mbps_events"] for r in svc_runs)
    cb_best = max(r["mbps_post_to_callback"] for r in svc_runs)
    rss_growth = max(r["rss_growth_mb"] for r in svc_runs)
    return {
        "file_bytes": SIZE,
        "runs_each": runs,
        "warmup_curl_s": round(warm, 3),
        "curl": curl_runs,
        "service": svc_runs,
        "curl_best_mbps": curl_best,
        "curl_median_mbps": statistics.median(r["mbps"] for r in curl_runs),
        "service_best_mbps_events": ev_best,
        "service_median_mbps_events": statistics.median(r["mbps_events"] for r in svc_runs),
        "service_best_mbps_post_to_callback": cb_best,
        "service_median_mbps_post_to_callback": statistics.median(
            r["mbps_post_to_callback"] for r in svc_runs
        ),
        "ratio_events_vs_curl_best": round(ev_best / curl_best, 3),
        "ratio_post_to_callback_vs_curl_best": round(cb_best / curl_best, 3),
        "rss_growth_mb_max": rss_growth,
        "all_identical": all(r["identical"] for r in svc_runs),
        "meets_ratio_target": ev_best / curl_best >= TARGET_RATIO,
        "meets_rss_target": rss_growth < TARGET_RSS_MB,
    }


def report(r: dict[str, Any]) -> str:
    curl = ", ".join(f"{x['mbps']:.0f}" for x in r["curl"])
    ev = ", ".join(f"{x['mbps_events']:.0f}" for x in r["service"])
    cb = ", ".join(f"{x['mbps_post_to_callback']:.0f}" for x in r["service"])
    rss = ", ".join(
        f"{x['rss_idle_mb']:.0f}->{x['rss_peak_mb']:.0f} (+{x['rss_growth_mb']:.1f})"
        for x in r["service"]
    )
    hwm = ", ".join(f"{x['vmhwm_before_mb']:.0f}->{x['vmhwm_after_mb']:.0f}" for x in r["service"])
    ccpu = ", ".join(
        f"{x['seconds']:.2f}/{x['cpu_user_s']:.2f}/{x['cpu_sys_s']:.2f}" for x in r["curl"]
    )
    scpu = ", ".join(
        f"{x['started_to_succeeded_s']:.2f}/{x['processor_cpu_user_s']:.2f}/"
        f"{x['processor_cpu_sys_s']:.2f}"
        for x in r["service"]
    )
    return (
        f"big_file: {r['file_bytes'] / 2**30:.0f} GiB, {r['runs_each']} runs each (best is the "
        f"headline), MB = 10^6 B\n"
        f"  curl                     MB/s: {curl}  (best {r['curl_best_mbps']:.0f})\n"
        f"  service started->succeeded MB/s: {ev}  (best {r['service_best_mbps_events']:.0f}, "
        f"{r['ratio_events_vs_curl_best']:.2f}x curl)\n"
        f"  service POST->callback   MB/s: {cb}  (best "
        f"{r['service_best_mbps_post_to_callback']:.0f}, "
        f"{r['ratio_post_to_callback_vs_curl_best']:.2f}x curl)\n"
        f"  wall/user/sys s: curl {ccpu}; processor {scpu}\n"
        f"  processor VmRSS MB idle->peak (growth): {rss}; VmHWM before->after: {hwm}\n"
        f"  files identical to the origin: {r['all_identical']}; targets: >= {TARGET_RATIO}x curl "
        f"{r['meets_ratio_target']}, RSS growth < {TARGET_RSS_MB:g} MB {r['meets_rss_target']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.runs))
    print(report(result))
    save_json("big_file.json", result)


if __name__ == "__main__":
    main()
