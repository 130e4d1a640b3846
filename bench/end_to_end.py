"""The 300-job scenario, end to end: POST -> download -> callback.

300 jobs over 5 aggregations (aggr_limit 10 each): job i goes to aggregation i % 5; one third
succeed (a 10 KB body), one third get 404, one third get 500. Every job is submitted with
max_retries 0, so a 500 fails at once instead of being retried after the backoff: every job
gets exactly one callback.

Two ways of submitting, each against `downloader run` (one process) and against api +
processor + notifier (three processes):
  - burst (the scenario, and the targets): 50 concurrent keep-alive clients POST all 300 jobs
    as fast as the API takes them;
  - paced (extra, for comparison): the same 300 jobs at a steady 100 jobs/s (3 s), i.e. an
    unsaturated service, which shows the per-job floor without the queueing of the burst.

Measured: wall time from the first POST leaving the driver to the last callback reaching the
receiver; POST-to-callback latency p50/p99 of the 100 successful 10 KB jobs (and of all
jobs); where a 10 KB job's time goes, from the job's events (GET /jobs/{id}/events) and the
origin's log. Targets (burst): p50 < 50 ms, whole run < 3 s. Each case runs `rounds` times on
a fresh stack (fresh Redis too); the round with the median p50 is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMALL_BODY_BYTES, Peers, Stack, percentile, save_json

JOBS = 300
AGGREGATIONS = 5
AGGR_LIMIT = 10
CONCURRENCY = 50
PACED_RATE = 100.0  # jobs/s
TARGET_P50_MS = 50.0
TARGET_WALL_S = 3.0
TOPOLOGIES = {"run": "downloader run (1 process)", "split": "api + processor + notifier"}

# (name, from mark, to mark): marks are event types plus post / origin / callback
STAGES = (
    ("post_to_accepted", "post", "job.accepted"),
    ("accepted_to_started", "job.accepted", "download.started"),
    ("started_to_origin_get", "download.started", "origin"),
    ("origin_get_to_succeeded", "origin", "download.succeeded"),
    ("succeeded_to_callback", "download.succeeded", "callback"),
)


def _job(i: int, peers: Peers, tag: str) -> tuple[str, dict[str, Any]]:
    kind = ("ok", "404", "500")[i % 3]
    path = f"ok/{tag}-{i}.bin" if kind == "ok" else f"status/{kind}/{tag}-{i}.bin"
    return kind, {
        "aggr_id": f"e2e-{tag}-{i % AGGREGATIONS}",
        "aggr_limit": AGGR_LIMIT,
        "url": peers.origin_url(path),
        "callback_type": "http",
        "callback_dst": peers.callback_url(tag),
        "extra": f"{tag}-{i}",
        "max_retries": 0,
    }


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "p50": round(1000 * percentile(values, 50), 1),
        "p99": round(1000 * percentile(values, 99), 1),
        "max": round(1000 * max(values), 1),
    }


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _events(base_url: str, job_ids: list[str]) -> dict[str, dict[str, float]]:
    """job id -> {event type: when it first happened, on CLOCK_MONOTONIC}.

    Event timestamps are Redis TIME in whole ms (wall clock), mapped onto the monotonic clock
    with the current offset: each carries up to 1 ms of rounding."""
    offset = time.time() - time.monotonic()
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as http:
        for job_id in job_ids:
            async with http.get(f"{base_url}/jobs/{job_id}/events") as r:
                data = await r.json()
            seen: dict[str, float] = {}
            for e in data.get("events", []):
                ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
                seen.setdefault(e["type"], ts - offset)
            out[job_id] = seen
    return out


async def _submit(
    http: aiohttp.ClientSession,
    url: str,
    jobs: list[tuple[str, dict[str, Any]]],
    rate: float | None,
) -> tuple[dict[str, tuple[float, str, str]], list[str]]:
    """POST every job: burst (CONCURRENCY workers) or paced (`rate` jobs/s, one task each).
    Returns {job id: (POST sent, kind, origin path)} and the errors."""
    posted: dict[str, tuple[float, str, str]] = {}
    errors: list[str] = []

    async def post(kind: str, body: dict[str, Any]) -> None:
        t = time.monotonic()
        async with http.post(url, json=body) as r:
            data = await r.json()
        if r.status != 201:
            errors.append(f"{r.status} {data}")
        else:
            posted[data["id"]] = (t, kind, body["url"].split("/origin/", 1)[1])

    if rate is None:
        it = iter(jobs)

        async def worker() -> None:
            for kind, body in it:  # shared iterator: bounded by len(jobs)
                await post(kind, body)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    else:
        start = time.monotonic()
        tasks = []
        for i, (kind, body) in enumerate(jobs):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(post(kind, body)))
        await asyncio.gather(*tasks)
    return posted, errors


async def _round(
    topology: str,
    peers: Peers,
    tag: str,
    rate: float | None = None,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    await peers.reset()
    async with Stack(topology, profile_dir=profile_dir) as stack:
        jobs = [_job(i, peers, tag) for i in range(JOBS)]
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as http:
            cpu0 = {**stack.cpu(), "peers": peers.cpu(), "driver": _self_cpu()}
            first_post = time.monotonic()
            posted, errors = await _submit(http, stack.base_url + "/download", jobs, rate)
            posts_done = time.monotonic()
        receipts = await peers.wait_callbacks(len(posted), timeout_s=60)
        cpu1 = {**stack.cpu(), "peers": peers.cpu(), "driver": _self_cpu()}
        hits = await peers.origin_hits()
        ok_ids = [j for j, (_t, kind, _p) in posted.items() if kind == "ok"]
        events = await _events(stack.base_url, ok_ids)

    by_job: dict[str, list[dict[str, Any]]] = {}
    for rec in receipts:
        by_job.setdefault(rec["job_id"], []).append(rec)
    wrong = []
    lat: dict[str, list[float]] = {"ok": [], "all": []}
    for job_id, (t_post, kind, _path) in posted.items():
        if job_id not in by_job:
            continue
        rec = by_job[job_id][0]
        expect = (True, 200) if kind == "ok" else (False, int(kind))
        if (rec["success"], rec["response_code"]) != expect:
            wrong.append({"job_id": job_id, "kind": kind, "got": rec})
        lat["all"].append(rec["t"] - t_post)
        if kind == "ok":
            lat["ok"].append(rec["t"] - t_post)
    stages: dict[str, list[float]] = {name: [] for name, _a, _b in STAGES}
    for job_id, seen in events.items():
        t_post, _kind, path = posted[job_id]
        marks = {**seen, "post": t_post}
        if path in hits:
            marks["origin"] = hits[path]
        if job_id in by_job:
            marks["callback"] = by_job[job_id][0]["t"]
        for name, a, b in STAGES:
            if a in marks and b in marks:
                stages[name].append(marks[b] - marks[a])
    last = max((r["t"] for r in receipts), default=float("nan"))
    return {
        "topology": topology,
        "submission": "burst" if rate is None else f"paced {rate:g}/s",
        "jobs_posted": len(posted),
        "post_errors": len(errors),
        "callbacks": len(receipts),
        "missing_callbacks": sum(1 for j in posted if j not in by_job),
        "duplicate_callbacks": sum(len(v) - 1 for v in by_job.values()),
        "wrong_outcomes": len(wrong),
        "wrong_examples": wrong[:3],
        "succeeded": sum(1 for r in receipts if r["success"]),
        "wall_s": round(last - first_post, 3),
        "posting_s": round(posts_done - first_post, 3),
        "latency_ok_ms": _ms(lat["ok"]),
        "latency_all_ms": _ms(lat["all"]),
        "ok_stages_ms": {name: _ms(v) for name, v in stages.items()},
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1 if k in cpu0},
    }


def _summarise(results: list[dict[str, Any]], burst: bool) -> dict[str, Any]:
    median = sorted(results, key=lambda r: r["latency_ok_ms"]["p50"])[len(results) // 2]
    out = {
        **median,
        "all_rounds_wall_s": [r["wall_s"] for r in results],
        "all_rounds_p50_ok_ms": [r["latency_ok_ms"]["p50"] for r in results],
        "all_rounds_p99_ok_ms": [r["latency_ok_ms"]["p99"] for r in results],
        "correct": all(
            r["missing_callbacks"] == 0 and r["wrong_outcomes"] == 0 and r["post_errors"] == 0
            for r in results
        ),
    }
    if burst:
        out["meets_p50_target"] = median["latency_ok_ms"]["p50"] < TARGET_P50_MS
        out["meets_wall_target"] = median["wall_s"] < TARGET_WALL_S
    return out


async def run(
    rounds: int = 3,
    rates: tuple[float, ...] = (PACED_RATE,),
    profile_dir: Path | None = None,
    topologies: tuple[str, ...] = tuple(TOPOLOGIES),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "jobs": JOBS,
        "aggregations": AGGREGATIONS,
        "aggr_limit": AGGR_LIMIT,
        "post_concurrency": CONCURRENCY,
        "success_body_bytes": SMALL_BODY_BYTES,
        "mix": "1/3 200 (10 KB), 1/3 404, 1/3 500; max_retries 0 on every job",
        "rounds": rounds,
        "targets": {"p50_ms": TARGET_P50_MS, "wall_s": TARGET_WALL_S},
        "burst": {},
        "paced": {},
    }
    async with Peers() as peers:
        for topology in topologies:
            prof = profile_dir / topology if profile_dir else None
            burst = [
                await _round(topology, peers, f"b{topology}{n}", None, prof) for n in range(rounds)
            ]
            out["burst"][topology] = _summarise(burst, True)
            for rate in rates:
                slow = [
                    await _round(topology, peers, f"p{topology}{rate:g}-{n}", rate)
                    for n in range(rounds)
                ]
                out["paced"][f"{topology}@{rate:g}"] = _summarise(slow, False)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [
        f"end_to_end: {r['jobs']} jobs, {r['aggregations']} aggregations x limit "
        f"{r['aggr_limit']}, {r['mix']}; median-p50 round of {r['rounds']}"
    ]
    for mode in ("burst", "paced"):
        for t in r[mode].values():
            ok, allj = t["latency_ok_ms"], t["latency_all_ms"]
            lines += [
                f"  [{t['submission']}] {TOPOLOGIES[t['topology']]}:",
                f"    wall {t['wall_s']:.2f} s (rounds {t['all_rounds_wall_s']}), POSTing took "
                f"{t['posting_s']:.2f} s; callbacks {t['callbacks']}/{t['jobs_posted']}, "
                f"{t['succeeded']} success, all rounds correct: {t['correct']}",
                f"    10 KB jobs POST->callback p50 {ok['p50']:.1f} ms, p99 {ok['p99']:.1f} ms "
                f"(p50 by round {t['all_rounds_p50_ok_ms']}); all jobs p50 {allj['p50']:.1f}, "
                f"p99 {allj['p99']:.1f} ms",
                "    stages of a 10 KB job, p50/p99 ms: "
                + ", ".join(
                    f"{k} {v['p50']:.0f}/{v['p99']:.0f}" for k, v in t["ok_stages_ms"].items()
                ),
                f"    CPU s: {t['cpu_s']}",
            ]
            if mode == "burst":
                lines.append(
                    f"    targets: p50 < {TARGET_P50_MS:g} ms {t['meets_p50_target']}, "
                    f"wall < {TARGET_WALL_S:g} s {t['meets_wall_target']}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-paced", action="store_true", help="skip the paced comparison")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[PACED_RATE],
        help=f"arrival rates (jobs/s) of the paced comparison (default {PACED_RATE:g})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the service processes of the burst rounds under cProfile, leaving "
        "DIR/<topology>/<role>.prof (of the last round); slows the service down",
    )
    parser.add_argument(
        "--topology", choices=sorted(TOPOLOGIES), action="append", help="only this one (repeatable)"
    )
    args = parser.parse_args()
    topologies = tuple(args.topology or TOPOLOGIES)
    rates = () if args.no_paced else tuple(args.rates)
    result = asyncio.run(run(args.rounds, rates, args.profile, topologies))
    print(report(result))
    save_json("end_to_end.json", result)


if __name__ == "__main__":
    main()
