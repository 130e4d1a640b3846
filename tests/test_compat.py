"""Moving from the original service: its own sample config runs the real CLI unchanged (plain
Redis and Sentinel), and request values its clients send that the original took are taken."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import KafkaException, Producer

from downloader.backends.kafka import PollingProducer, producer_config
from downloader.config import load_config
from downloader.embedded import EmbeddedRedis
from downloader.storage import Keys
from harness.redis_nodes import MASTER_NAME, SentinelGroup, StrRedis
from harness.servers import CallbackReceiver, FileServer, free_port, wait_http
from tests.conftest import ROOT, Service

# the original service's own sample config, copied byte for byte from where it was shared
# (/work/shared/compat/original-config.sample.json): leave it as it is, the tests run it unchanged
ORIGINAL_SAMPLE = ROOT / "tests" / "data" / "original-config.sample.json"
SAMPLE_BYTES = ORIGINAL_SAMPLE.read_bytes()
ServiceFactory = Callable[..., Any]


# -- the sample config, through the real CLI --------------------------------------------------


class OriginalConfigRun:
    """`downloader run -c <a copy of the original's sample>`: the file as it is, with only the
    environment pointing it at the test's Redis, a free port and directories under tmp."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None) -> None:
        self.config_path = tmp / "config.json"
        if config is None:
            shutil.copyfile(ORIGINAL_SAMPLE, self.config_path)
        else:
            self.config_path.write_text(json.dumps(config, indent=2))
        self.files_root = tmp / "files"
        self.port = free_port()
        self.log_path = tmp / "run.log"
        self.env = {
            **os.environ,
            "DOWNLOADER__API__PORT": str(self.port),
            "DOWNLOADER__PROCESSOR__FILESTORAGE__ROOTDIR": str(self.files_root),
            "DOWNLOADER__PROCESSOR__STORAGE_DIR": str(tmp / "work"),
            # the test's origin and receiver are on loopback, which production refuses
            "DOWNLOADER__SECURITY__ALLOW_PRIVATE_NETWORKS": "true",
        }
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OriginalConfigRun:
        args = [sys.executable, "-m", "downloader", "run", "-c", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env
            )
        return self

    async def submit_like_curl(self, body: dict[str, Any]) -> str:
        """POST the way the original's README does: `curl -d '<json>'` (form-encoded type)."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.base_url + "/download",
                data=json.dumps(body),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp,
        ):
            answer = await resp.json(content_type=None)
            assert resp.status == 201, answer
            return str(answer["id"])

    def stop(self) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(30)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running(run: OriginalConfigRun) -> AsyncIterator[OriginalConfigRun]:
    try:
        run.start()
        await wait_http(run.base_url + "/dashboard/aggregations", timeout=30)
        yield run
        assert run.stop() == 0, run.log()[-3000:]
    finally:
        run.kill()


async def one_job_end_to_end(
    run: OriginalConfigRun, files: FileServer, receiver: CallbackReceiver
) -> str:
    """One job in the original's legacy form (callback_url) is downloaded into the rootdir and
    called back; the config's default request headers went to the origin."""
    url = files.add("/hello.txt", b"hello from the original's config\n")
    job_id = await run.submit_like_curl(
        {
            "aggr_id": "aggrFooBar",
            "aggr_limit": 8,
            "url": url,
            "callback_url": receiver.url("/cb"),
            "extra": "foobar",
            "mime_type": "text/*",
        }
    )
    [payload] = await receiver.wait_for(job_id, timeout=30)
    assert (payload["success"], payload["extra"], payload["error"]) == (True, "foobar", ""), payload
    assert payload["download_url"].endswith(f"/{job_id[:3]}/{job_id}")
    stored = run.files_root / job_id[:3] / job_id
    assert stored.read_bytes() == b"hello from the original's config\n"
    assert list((run.files_root / ".tmp").iterdir()) == []
    [request] = files.requests["/hello.txt"]
    assert (request["Accept"], request["User-Agent"]) == ("*/*", "Downloader v1")
    return job_id


def assert_warned_once_each(log: str) -> None:
    """The two keys of the sample that mean nothing here are warned about once each."""
    assert log.count("notifier.download_url is ignored") == 1, log[-3000:]
    assert log.count("backends.kafka['go.delivery.reports'] is ignored") == 1, log[-3000:]


@pytest.mark.timeout(120)
async def test_original_sample_config_runs_a_job_end_to_end(
    redis_server: EmbeddedRedis,
    redis_client: StrRedis,
    tmp_path: Path,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """`downloader run -c` on the original's sample, byte for byte: it starts (its Kafka
    backend points at a broker that is not there), warns once about each key that means
    nothing here, runs a job end to end and stops cleanly; the file is left as it was."""
    run = OriginalConfigRun(tmp_path)
    run.env["DOWNLOADER__REDIS__ADDR"] = redis_server.addr
    async with running(run):
        await one_job_end_to_end(run, files, receiver)
    assert run.config_path.read_bytes() == SAMPLE_BYTES
    assert_warned_once_each(run.log())


async def test_original_sample_with_a_sentinel_list_runs_a_job_end_to_end(
    sentinels: SentinelGroup, tmp_path: Path, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The sample with the original's Sentinel form (`redis.sentinel` a list of addresses,
    `redis.master_name`; its `redis.addr` left in and unused) runs a job end to end on the
    master the sentinels name."""
    config = json.loads(SAMPLE_BYTES)
    config["redis"]["sentinel"] = [f"127.0.0.1:{s.port}" for s in sentinels.sentinels]
    config["redis"]["master_name"] = MASTER_NAME
    run = OriginalConfigRun(tmp_path, config)
    async with running(run):
        job_id = await one_job_end_to_end(run, files, receiver)
    async with sentinels.master.client() as master:
        keys = Keys("dl")  # its projection, or its packed copy once settled
        assert await master.exists(keys.job(job_id), keys.done(job_id)) == 1
    assert_warned_once_each(run.log())


def test_go_client_settings_are_dropped_so_librdkafka_starts() -> None:
    """librdkafka refuses the Go client's go.* properties; the sample's Kafka settings without
    them start a producer (nothing needs the broker to be there)."""
    raw = json.loads(SAMPLE_BYTES)["backends"]["kafka"]
    with pytest.raises(KafkaException, match=r"go\.delivery\.reports"):
        Producer(producer_config(raw))
    config = load_config(ORIGINAL_SAMPLE, environ={}, warnings=[])
    assert config.backends.kafka is not None
    producer = PollingProducer(config.backends.kafka)
    producer.start()
    assert producer.close(timeout_s=1) == 0


# -- request values the original's clients send -----------------------------------------------


@pytest.fixture
async def api(service_factory: ServiceFactory) -> Service:
    """The API alone: jobs stay queued."""
    return await service_factory(None, {"api"})  # type: ignore[no-any-return]


def body(**fields: Any) -> dict[str, Any]:
    return {
        "aggr_id": "compat",
        "aggr_limit": 2,
        "url": "http://origin.test/a.png",
        "callback_type": "http",
        "callback_dst": "http://receiver.test/cb",
        **fields,
    }


ACCEPTED = [
    pytest.param(body(aggr_limit=100_000), {"aggr_limit": 100_000}, id="aggr_limit-100000"),
    pytest.param(body(aggr_limit=2**31 - 1), {"aggr_limit": 2**31 - 1}, id="aggr_limit-int32-max"),
    pytest.param(body(max_retries=1000), {"max_retries": 1000}, id="max_retries-1000"),
    pytest.param(body(download_timeout=0), {"download_timeout": 0}, id="download_timeout-0"),
    pytest.param(
        body(s3_bucket="", s3_region=""), {"s3_bucket": "", "s3_region": ""}, id="s3-empty"
    ),
    pytest.param(
        body(callback_url=""),
        {"callback_type": "http", "callback_dst": "http://receiver.test/cb"},
        id="callback_url-empty-beside-type-dst",
    ),
    pytest.param(
        {
            **body(callback_type="", callback_dst=""),
            "callback_url": "http://receiver.test/legacy",
        },
        {"callback_type": "http", "callback_dst": "http://receiver.test/legacy"},
        id="type-dst-empty-beside-callback_url",
    ),
]


@pytest.mark.parametrize(("request_body", "stored"), ACCEPTED)
async def test_values_the_original_accepts_are_accepted(
    api: Service, request_body: dict[str, Any], stored: dict[str, Any]
) -> None:
    """A value the original took and that is harmless here is a 201, stored as it means."""
    status, answer = await api.post("/download", request_body)
    assert status == 201, answer
    job = await api.job(answer["id"])
    assert {k: job[k] for k in stored} == stored


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        pytest.param(body(aggr_limit=2**31), "aggr_limit", id="aggr_limit-over-int32"),
        pytest.param(body(aggr_limit="10"), "aggr_limit", id="aggr_limit-string"),
        pytest.param(body(max_retries=2**31), "max_retries", id="max_retries-over-int32"),
        pytest.param(body(download_timeout=-1), "download_timeout", id="download_timeout-neg"),
        pytest.param(body(s3_bucket="", s3_region="eu-west-1"), "s3_bucket", id="s3-half-empty"),
        pytest.param(body(callback_type="", callback_dst=""), "callback_url", id="no-callback"),
    ],
)
async def test_leniency_keeps_types_and_rules(
    api: Service, request_body: dict[str, Any], field: str
) -> None:
    """What stays refused: past 32 bits, strings for ints, half a bucket, no callback at all."""
    status, answer = await api.post("/download", request_body)
    assert status == 400, answer
    assert field in answer["error"]


async def test_download_timeout_zero_means_the_default(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """download_timeout 0 (a Go client's unset int) downloads with the configured timeout."""
    url = files.add("/z.txt", b"zero\n")
    job_id = await service.submit(
        **body(url=url, callback_dst=receiver.url("/cb"), download_timeout=0)
    )
    [payload] = await receiver.wait_for(job_id)
    assert payload["success"] is True, payload
