"""Run every benchmark (enqueue, end_to_end, big_file), print a summary table and write
bench/results/latest.json (git-ignored) with the results and where they were measured."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import big_file
import end_to_end
import enqueue
from common import ROOT, busy_cores, cpu_ticks, git_commit, save_json

BENCHES = ("enqueue", "end_to_end", "big_file")


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "downloader"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "service_tree_dirty": bool(dirty),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_avg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "redis_py": metadata.version("redis"),
    }


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.3) -> dict[str, Any]:
    """Wait (at most `max_wait_s`) until the machine is nearly idle over a 3 s window: the
    2 cores are shared with other work, which would otherwise land in the numbers."""
    deadline = time.monotonic() + max_wait_s
    while True:
        t0 = cpu_ticks()
        time.sleep(3)
        busy = busy_cores(t0, cpu_ticks())
        if busy["busy_cores"] <= threshold_cores or time.monotonic() >= deadline:
            return {**busy, "quiet": busy["busy_cores"] <= threshold_cores}
        print(
            f"  machine busy ({busy['busy_cores']:.2f} cores used by others); waiting", flush=True
        )


def _row(
    bench: str, metric: str, value: str, target: str = "", met: bool | None = None
) -> list[str]:
    return [bench, metric, value, target, "" if met is None else ("yes" if met else "NO")]


def summary(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    if e := results.get("enqueue"):
        lat = e["latency_ms"]
        rows += [
            _row(
                "enqueue",
                f"POST /download req/s ({e['concurrency']} clients)",
                f"{e['req_per_s']:.0f}",
            ),
            _row("enqueue", "latency p50 / p99", f"{lat['p50']:.1f} / {lat['p99']:.1f} ms"),
        ]
    if e2e := results.get("end_to_end"):
        for mode in ("burst", "paced"):
            for topo, t in e2e[mode].items():
                name = f"e2e {mode} {topo}"
                ok = t["latency_ok_ms"]
                if mode == "burst":
                    rows += [
                        _row(
                            name,
                            "wall, first POST -> last callback",
                            f"{t['wall_s']:.2f} s",
                            "< 3 s",
                            t["meets_wall_target"],
                        ),
                        _row(
                            name,
                            "10 KB POST->callback p50",
                            f"{ok['p50']:.0f} ms",
                            "< 50 ms",
                            t["meets_p50_target"],
                        ),
                        _row(name, "10 KB POST->callback p99", f"{ok['p99']:.0f} ms"),
                    ]
                else:
                    rows.append(
                        _row(
                            name,
                            "10 KB POST->callback p50 / p99",
                            f"{ok['p50']:.1f} / {ok['p99']:.1f} ms",
                        )
                    )
    if b := results.get("big_file"):
        rows += [
            _row("big file", "curl MB/s (best of 3)", f"{b['curl_best_mbps']:.0f}"),
            _row(
                "big file",
                "service MB/s, started->succeeded (best)",
                f"{b['service_best_mbps_events']:.0f} ({b['ratio_events_vs_curl_best']:.2f}x curl)",
                ">= 0.9x curl",
                b["meets_ratio_target"],
            ),
            _row(
                "big file",
                "service MB/s, POST->callback (best)",
                f"{b['service_best_mbps_post_to_callback']:.0f} "
                f"({b['ratio_post_to_callback_vs_curl_best']:.2f}x curl)",
            ),
            _row(
                "big file",
                "processor RSS growth (max of runs)",
                f"{b['rss_growth_mb_max']:.1f} MB",
                "< 30 MB",
                b["meets_rss_target"],
            ),
        ]
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["benchmark", "metric", "value", "target", "met"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120,
        metavar="S",
        help="before each benchmark, wait up to S seconds for the machine to be idle (0: no)",
    )
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": _machine(), "machine_load": {}}
    started = time.monotonic()
    for name in args.only:
        print(f"== {name}", flush=True)
        before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else {}
        ticks = cpu_ticks()
        t0 = time.monotonic()
        if name == "enqueue":
            out[name] = asyncio.run(enqueue.run())
            print(enqueue.report(out[name]))
        elif name == "end_to_end":
            out[name] = asyncio.run(end_to_end.run(rates=(100.0, 500.0)))
            print(end_to_end.report(out[name]))
        else:
            out[name] = asyncio.run(big_file.run())
            print(big_file.report(out[name]))
        during = busy_cores(ticks, cpu_ticks())
        out["machine_load"][name] = {"idle_check_before": before, "during": during}
        print(
            f"   ({time.monotonic() - t0:.0f} s; machine-wide {during['busy_cores']:.2f} cores "
            f"busy on average, benchmark included)\n",
            flush=True,
        )
    out["summary"] = summary(out)
    out["total_s"] = round(time.monotonic() - started, 1)
    m = out["machine"]
    dirty = " (+ uncommitted service changes)" if m["service_tree_dirty"] else ""
    print(
        f"summary: {m['date']}, commit {m['commit']}{dirty}, "
        f"{m['cpus']} cores ({m['cpu_model']}), Python {m['python']}"
    )
    print(table(out["summary"]))
    path = save_json("latest.json", out)
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
