"""The data's layout is fixed: a process whose `redis.shards` differs from the one the data was
written with, or that finds work left unfinished by the data model before shards, refuses to
start (exit 2, one line saying what to do) instead of stranding those jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from downloader.config import Config
from downloader.embedded import EmbeddedRedis
from downloader.storage import Storage, connect
from harness.redis_nodes import StrRedis
from harness.servers import TcpRelay, until
from tests.conftest import Proc

MakeConfig = Callable[..., tuple[Path, Config]]
Spawn = Callable[..., Proc]


async def exit_code(proc: Proc, timeout_s: float = 30) -> int:
    assert proc.popen is not None
    return await asyncio.to_thread(proc.popen.wait, timeout_s)


async def record_layout(config: Config) -> None:
    """What the first process of a service does: record the layout (16 shards)."""
    storage = Storage(connect(config), config)
    try:
        assert await storage.layout_problem() is None
    finally:
        await storage.close()


async def test_another_shard_count_refuses_to_start_and_changes_nothing(
    spawn: Spawn, make_config: MakeConfig, redis_client: StrRedis
) -> None:
    """With data laid out in 16 shards, a processor and `rebuild` configured for 8 exit 2 naming
    both counts; the recorded layout stays 16."""
    _path, config = make_config()
    await record_layout(config)
    path, _ = make_config({"redis": {"shards": 8}}, "eight.json")
    for role in ("processor", "rebuild"):
        proc = spawn(role, path)
        assert await exit_code(proc) == 2, proc.log()
        assert (
            "error: redis.shards is 8, but the data in this Redis is laid out in 16 shards: "
            "set redis.shards to 16" in proc.log()
        ), proc.log()
    assert await redis_client.hget("dl:{meta}:layout", "shards") == "16"


async def test_work_left_by_the_earlier_data_model_refuses_to_start(
    spawn: Spawn, make_config: MakeConfig, redis_client: StrRedis
) -> None:
    """Downloads running and callbacks to deliver under the earlier model's global keys stop a
    notifier at start, naming what is left; once that work is done, it starts."""
    path, config = make_config()
    await redis_client.zadd("dl:leases", {"OldJob00000001": 1})
    await redis_client.xadd("dl:callbacks", {"job_id": "OldJob00000001"})
    proc = spawn("notifier", path)
    assert await exit_code(proc) == 2
    assert (
        "error: this Redis holds unfinished work of the earlier data model (1 downloads "
        "running, 1 callbacks to deliver): finish it with the earlier version first"
    ) in proc.log(), proc.log()

    await redis_client.delete("dl:leases", "dl:callbacks")
    storage = Storage(connect(config), config)
    try:
        assert await storage.layout_problem() is None
    finally:
        await storage.close()


async def test_a_redis_that_answers_late_is_checked_then(
    spawn: Spawn, make_config: MakeConfig, redis_server: EmbeddedRedis, redis_client: StrRedis
) -> None:
    """A processor started while its Redis does not answer runs on; once Redis answers and the
    layout does not fit, it stops with exit code 2."""
    _path, config = make_config()
    await record_layout(config)
    relay = await TcpRelay(redis_server.port).start()
    await relay.stop()
    try:
        path, _ = make_config(
            {"redis": {"addr": f"127.0.0.1:{relay.port}", "shards": 4}}, "late.json"
        )
        proc = spawn("processor", path)
        await until(lambda: "backing off" in proc.log(), timeout=15)  # its loops run
        assert proc.popen is not None and proc.popen.poll() is None, proc.log()
        await relay.start()
        assert await exit_code(proc) == 2, proc.log()
        assert "this Redis cannot be served with this config" in proc.log()
    finally:
        await relay.stop()
