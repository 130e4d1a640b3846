"""What operators see: Prometheus metrics per role and in `run` mode, and JSON log lines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from harness.servers import CallbackReceiver, FileServer, Reply, free_port, job_request, wait_http
from tests.conftest import Service


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


def json_records(proc: Any) -> list[dict[str, Any]]:
    """The JSON log lines a process wrote (other lines, e.g. librdkafka's, are skipped)."""
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_every_job_outcome_and_retry_is_one_info_line_with_its_ids(
    spawn: Any, make_config: Any, files: FileServer, receiver: CallbackReceiver
) -> None:
    """At info, a success, a scheduled retry, a failed download, a delivered callback and a
    failed callback are each one JSON line naming the job and its aggregation."""
    port = free_port()
    path, _config = make_config(
        {"log": {"format": "json", "level": "info"}, "notifier": {"retry_schedule_seconds": []}}
    )
    proc = spawn("run", path, port)
    api = f"http://127.0.0.1:{port}"
    await wait_http(f"{api}/hb")
    ok = files.add("/ok.txt", b"fine\n")
    flaky = files.add("/flaky", Reply(status=503), Reply(status=404))
    dead_port = free_port()  # nothing listens: every callback attempt fails
    async with aiohttp.ClientSession() as s:

        async def submit(body: dict[str, Any]) -> str:
            async with s.post(f"{api}/download", json=body) as r:
                assert r.status == 201, await r.text()
                return str((await r.json())["id"])

        good = await submit(job_request(ok, receiver.url("/cb"), aggr_id="logs-a"))
        bad = await submit(
            job_request(flaky, f"http://127.0.0.1:{dead_port}/cb", aggr_id="logs-b", max_retries=1)
        )
        await receiver.wait_for(good)
        deadline = asyncio.get_running_loop().time() + 15
        while not any(
            r.get("event") == "callback failed" and r.get("job_id") == bad
            for r in json_records(proc)
        ):
            assert asyncio.get_running_loop().time() < deadline, proc.log()[-3000:]
            await asyncio.sleep(0.05)
    assert proc.terminate() == 0
    lines = {(r["event"], r.get("job_id")): r for r in json_records(proc)}
    for event, job_id, aggr in (
        ("download succeeded", good, "logs-a"),
        ("callback delivered", good, "logs-a"),
        ("download retry scheduled", bad, "logs-b"),
        ("download failed", bad, "logs-b"),
        ("callback failed", bad, "logs-b"),
    ):
        record = lines.get((event, job_id))
        assert record is not None, (event, sorted(lines))
        assert record["level"] == "info" and record["aggr_id"] == aggr, record
    assert lines[("download failed", bad)]["error"] == "Received status code 404"
    assert lines[("callback failed", bad)]["error"] == (
        f"could not connect to 127.0.0.1:{dead_port} (connection refused)"
    )


async def test_connection_errors_read_as_sentences_in_callbacks_and_projections(
    service: Service, receiver: CallbackReceiver
) -> None:
    """A download from a closed port fails with `could not connect to HOST:PORT (connection
    refused)` in the callback and in the projection, not aiohttp's internal wording."""
    closed = free_port()
    job_id = await service.submit(
        **job_request(f"http://127.0.0.1:{closed}/x", receiver.url("/cb"), max_retries=0)
    )
    [callback] = await receiver.wait_for(job_id)
    expected = f"could not connect to 127.0.0.1:{closed} (connection refused)"
    assert callback["error"] == expected
    assert callback["response_code"] == 0
    job = await service.wait_job(job_id, lambda j: j["callback_state"] == "Success")
    assert job["error"] == expected
