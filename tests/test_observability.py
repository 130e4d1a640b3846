"""What operators see: Prometheus metrics per role and in `run` mode, and JSON log lines."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import Service
from tests.servers import CallbackReceiver, FileServer, free_port, wait_http


async def test_run_mode_metrics_cover_every_role(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """In one process the API's /metrics counts accepted jobs, downloads and callbacks."""
    job_id = await service.submit(
        aggr_id="m", aggr_limit=1, url=files.add("/m", b"x"), callback_url=receiver.url("/cb")
    )
    await receiver.wait_for(job_id)
    await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert service.http is not None
    async with service.http.get(service.base_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "downloader_jobs_accepted_total" in text
    assert 'downloader_download_attempts_total{outcome="succeeded"}' in text
    assert 'downloader_callback_attempts_total{backend="http",outcome="delivered"}' in text


async def test_standalone_processor_serves_metrics_on_its_port(
    spawn: Any, make_config: Any
) -> None:
    """processor.metrics_port exposes that process's Prometheus metrics."""
    port = free_port()
    path, _config = make_config({"processor": {"metrics_port": port}})
    spawn("processor", path)
    await wait_http(f"http://127.0.0.1:{port}/metrics")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    assert "downloader_processor_workers" in text


async def test_json_logs_are_one_object_per_line(spawn: Any, make_config: Any) -> None:
    """With log.format json every line the process writes is a JSON object with event and level."""
    port = free_port()
    path, _config = make_config({"log": {"format": "json", "level": "info"}})
    proc = spawn("api", path, port)
    await wait_http(f"http://127.0.0.1:{port}/hb")
    assert proc.terminate() == 0
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]
    assert any(r["event"] == "api listening" and r["level"] == "info" for r in records)
    assert all("timestamp" in r for r in records)
