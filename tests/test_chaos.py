"""Chaos: random SIGKILLs of api, processor and notifier processes lose no job (the scenario of
harness/chaos.py, which bench/chaos.py runs bigger)."""

from __future__ import annotations

from pathlib import Path

import pytest

from downloader.embedded import EmbeddedRedis
from harness.chaos import Chaos, ChaosSpec, summary

SPEC = ChaosSpec(jobs=300, aggregations=20, min_kills=10, submit_s=8.0, drain_timeout_s=30.0)


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("redis_client")  # a flushed database
async def test_random_sigkills_lose_no_job_and_every_job_calls_back(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """300 jobs through 2 api, 3 processor and 2 notifier processes, 10+ of them SIGKILLed and
    restarted at random: every job ends once, as scripted, with a delivered callback."""
    result = await Chaos(SPEC, redis_server.addr, tmp_path).run()
    print("\n  " + summary(result))
    assert result.kills >= SPEC.min_kills
    assert result.lost == 0, result.lost_examples
    assert result.problems == []
    assert result.jobs_in_redis == SPEC.jobs  # a retried POST never made a second job
    assert result.succeeded == SPEC.jobs - SPEC.jobs // 10
    assert result.failed == SPEC.jobs // 10
