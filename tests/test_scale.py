"""Scaling out: three processor processes drain a backlog together, and the aggregation caps
hold across them. (How much faster three are than one is measured by bench/scale.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from downloader.config import Config
from downloader.storage import Keys
from harness.events import EventTail
from harness.redis_nodes import StrRedis
from harness.scale import GatedOrigin, wait_succeeded
from harness.servers import CallbackReceiver
from tests.conftest import Proc, Service

JOBS = 300
AGGREGATIONS = 30
AGGR_LIMIT = 2  # x 30 aggregations: 60 downloads may run at once, far above one processor's 8
MAX_WORKERS = 8  # per processor process
PROCESSORS = 3


@pytest.mark.timeout(120)
async def test_three_processors_share_a_backlog_within_the_caps(
    make_config: Callable[..., tuple[Path, Config]],
    service_factory: Callable[..., Awaitable[Service]],
    redis_client: StrRedis,
    receiver: CallbackReceiver,
    spawn: Callable[..., Proc],
) -> None:
    """Three processors with 8 workers each all work at once (the origin answers nothing until
    24 requests wait), every job succeeds exactly once, and no aggregation ever runs more than
    its cap of 2 downloads across the three."""
    config_path, config = make_config({"processor": {"max_workers": MAX_WORKERS}}, "scale.json")
    keys = Keys(config.redis.key_prefix, config.redis.shards)
    api = await service_factory(roles={"api"})
    origin = await GatedOrigin().start()
    try:
        origin.arm(open_at=PROCESSORS * MAX_WORKERS)
        ids = []
        for i in range(JOBS):
            aggr = f"scale{i % AGGREGATIONS}"
            ids.append(
                await api.submit(
                    aggr_id=aggr,
                    aggr_limit=AGGR_LIMIT,
                    url=origin.url(f"/{aggr}/job{i}"),
                    callback_url=receiver.url("/cb"),
                )
            )
        tail = EventTail(redis_client, keys)
        tail.last = await tail.last_id()
        procs = [spawn("processor", config_path) for _ in range(PROCESSORS)]
        try:
            succeeded = await wait_succeeded(tail, JOBS, timeout_s=90)
        finally:
            for p in procs:
                assert p.terminate() == 0, p.log()
    finally:
        await origin.close()
    assert origin.gate.is_set()  # all three processors had their 8 workers busy at once
    assert Counter(succeeded) == Counter(ids)  # each job once
    # one request a job: no lease lapsed, no download went twice
    assert origin.requests == JOBS, {
        t: tail.count(t) for t in ("download.started", "download.requeued")
    }
    assert len(origin.max_inflight) == AGGREGATIONS
    assert max(origin.max_inflight.values()) <= AGGR_LIMIT, origin.max_inflight
