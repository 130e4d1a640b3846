"""Kafka: callbacks and the event export against a real Apache Kafka broker (KRaft, topic
auto-creation off), started for this module unless KAFKA_BOOTSTRAP_SERVERS names one.

Everything is checked by consuming the topics with a real confluent-kafka Consumer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from downloader.config import Config
from downloader.storage import Keys
from harness.events import EventTail
from harness.kafka_broker import (
    KAFKA_VERSION,
    KafkaBroker,
    _marker,
    create_topic,
    default_cache_dir,
    external_bootstrap,
    kafka_available,
)
from harness.redis_nodes import StrRedis
from harness.servers import CallbackReceiver, FileServer, free_port, job_request, wait_http
from tests.conftest import Proc, Service
from tests.images import png

MakeConfig = Callable[..., tuple[Path, Config]]
ServiceFactory = Callable[..., Any]
Spawn = Callable[..., Proc]

# A cold jar cache means a Maven fetch inside the first test's set-up: give it room.
_COLD_CACHE = not external_bootstrap() and not _marker(default_cache_dir(), KAFKA_VERSION).exists()
pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900 if _COLD_CACHE else 60)]


# -- the broker ----------------------------------------------------------------------------------


@dataclass
class Kafka:
    """The module's broker: its address, and the broker itself when this module started it."""

    bootstrap: str
    broker: KafkaBroker | None  # None: an external broker, which the tests must not stop

    def settings(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """`backends.kafka` for the service: this broker, failures reported within 10 s."""
        return {"bootstrap.servers": self.bootstrap, "message.timeout.ms": 10_000, **(extra or {})}

    async def new_topic(self, prefix: str, partitions: int = 1) -> str:
        """A fresh topic with a unique name, created (auto-creation is off) and led."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(create_topic, self.bootstrap, name, partitions)
        return name

    def auto_creates_topics(self) -> bool:
        """Whether the broker creates a topic on first use (only an external one might)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        broker_id = next(iter(admin.list_topics(timeout=10).brokers))
        resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_id))
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        return str(configs["auto.create.topics.enable"].value).lower() == "true"


@pytest.fixture(scope="module")
def kafka() -> Iterator[Kafka]:
    """$KAFKA_BOOTSTRAP_SERVERS, or one single-node KRaft broker for the module (auto-create off);
    with no way to get one the tests skip, or fail under CI=true."""
    external = external_bootstrap()
    if external:
        yield Kafka(external, None)
        return
    ok, why = kafka_available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no Kafka broker can be started: {why}", pytrace=False)
        pytest.skip(f"Kafka tests need a broker: {why}")
    broker = KafkaBroker(auto_create_topics=False)
    try:
        broker.start()
        yield Kafka(broker.bootstrap_servers, broker)
    finally:
        broker.close()


# -- reading topics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One consumed message."""

    key: str
    value: dict[str, Any]
    headers: list[tuple[str, bytes]]
    partition: int
    offset: int

    def header(self, name: str) -> str:
        [value] = [v for k, v in self.headers if k == name]
        return value.decode()


def _headers(
    headers: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None,
) -> list[tuple[str, bytes]]:
    """A message's headers as (name, bytes) pairs (confluent-kafka types them loosely)."""
    pairs = list(headers.items()) if isinstance(headers, dict) else (headers or [])
    return [(k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs]


class TopicReader:
    """Reads one topic from its beginning with a consumer group of its own, off the event loop."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[Record] = []
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])

    async def until(
        self, predicate: Callable[[list[Record]], bool], timeout_s: float = 20
    ) -> list[Record]:
        """Consume until `predicate(all records so far)` holds; every record so far."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.records):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                keys = sorted({r.key for r in self.records})
                raise TimeoutError(f"{self.topic}: {len(self.records)} records, keys {keys}")
            batch = await asyncio.to_thread(self.consumer.consume, 500, min(0.25, remaining))
            for msg in batch:
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                self.records.append(
                    Record(
                        key=(msg.key() or b"").decode(),
                        value=json.loads(msg.value() or b"null"),
                        headers=_headers(msg.headers()),
                        partition=msg.partition() or 0,
                        offset=msg.offset() or 0,
                    )
                )
        return self.records

    async def keys(self, wanted: set[str], timeout_s: float = 20) -> dict[str, list[Record]]:
        """Consume until every key in `wanted` was seen; the records of each key."""
        await self.until(lambda rs: wanted <= {r.key for r in rs}, timeout_s)
        by_key: dict[str, list[Record]] = defaultdict(list)
        for r in self.records:
            by_key[r.key].append(r)
        return by_key

    async def message_count(self) -> int:
        """How many messages the topic holds (sum of its partitions' high watermarks)."""

        def count() -> int:
            meta = self.consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            return sum(
                self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                for p in meta.partitions
            )

        return await asyncio.to_thread(count)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def read_topic(kafka: Kafka) -> Iterator[Callable[[str], TopicReader]]:
    """`read_topic(name)` -> a TopicReader; all are closed at the end."""
    readers: list[TopicReader] = []

    def make(topic: str) -> TopicReader:
        readers.append(TopicReader(kafka.bootstrap, topic))
        return readers[-1]

    yield make
    for r in readers:
        r.close()


# -- the service, as real OS processes ----------------------------------------------------------


class Api:
    """A spawned `downloader api` process, spoken to over HTTP."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http, self.base_url = http, base_url

    async def submit(self, **body: Any) -> str:
        async with self.http.post(f"{self.base_url}/download", json=body) as r:
            data = await r.json()
            assert r.status == 201, data
            return str(data["id"])

    async def get(self, path: str) -> Any:
        async with self.http.get(self.base_url + path) as r:
            data = await r.json()
            assert r.status == 200, data
            return data


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_api(spawn: Spawn, config_path: Path, http: aiohttp.ClientSession) -> Api:
    port = free_port()
    spawn("api", config_path, port)
    api = Api(http, f"http://127.0.0.1:{port}")
    await wait_http(f"{api.base_url}/hb")
    return api


# -- jobs and payloads ---------------------------------------------------------------------------


def kafka_job(url: str, topic: str, **extra: Any) -> dict[str, Any]:
    fields = {"aggr_id": "kafka", "aggr_limit": 8, "callback_type": "kafka", **extra}
    return job_request(url, topic, **fields)


def success_payload(job_id: str, url: str, extra: str = "") -> dict[str, Any]:
    """The SPEC §4 payload of a successful download without image size (test config)."""
    return {
        "success": True,
        "error": "",
        "extra": extra,
        "resource_url": url,
        "download_url": f"http://files.test/dl/{job_id[:3]}/{job_id}",
        "job_id": job_id,
        "response_code": 200,
        "delivered": True,
        "delivery_error": "",
        "image_size": "",
    }


def event_types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# -- callbacks -----------------------------------------------------------------------------------


async def test_success_and_failure_callbacks_carry_the_exact_payload_key_and_event_id(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """A success and a failure callback are produced once each, keyed by job id, with the exact
    payload and the download-outcome event id in the `event-id` header."""
    topic = await kafka.new_topic("callbacks")
    svc: Service = await service_factory({"backends": {"kafka": kafka.settings()}})
    ok_url = files.add("/ok.png", png(7, 9))
    bad_url = files.url("/missing.png")
    ok = await svc.submit(**kafka_job(ok_url, topic, extra="e-ok", extract_image_size=True))
    bad = await svc.submit(**kafka_job(bad_url, topic, extra="e-bad"))
    jobs = {j: await svc.wait_job(j, lambda p: p["callback_state"] == "Success") for j in (ok, bad)}

    reader = read_topic(topic)
    records = await reader.keys({ok, bad})
    assert await reader.message_count() == 2  # nothing else, no duplicate
    [ok_rec], [bad_rec] = records[ok], records[bad]
    assert ok_rec.value == {
        **success_payload(ok, ok_url, "e-ok"),
        "image_size": "7x9",
    }
    assert bad_rec.value == {
        "success": False,
        "error": "Received status code 404",
        "extra": "e-bad",
        "resource_url": bad_url,
        "download_url": "",
        "job_id": bad,
        "response_code": 404,
        "delivered": True,
        "delivery_error": "",
        "image_size": "",
    }
    for job_id, record, outcome in (
        (ok, ok_rec, "download.succeeded"),
        (bad, bad_rec, "download.failed"),
    ):
        assert [k for k, _v in record.headers] == ["event-id"]
        assert record.header("event-id") == jobs[job_id]["outcome_event_id"]
        _status, body = await svc.get(f"/jobs/{job_id}/events")
        [outcome_event] = [e for e in body["events"] if e["type"] == outcome]
        assert outcome_event["id"] == jobs[job_id]["outcome_event_id"]
        assert jobs[job_id]["callback_attempts"] == 1
        assert jobs[job_id]["delivery_error"] == ""


async def test_unknown_topic_fails_with_the_broker_error_and_retry_delivers_once_it_exists(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """A callback to a missing topic fails every attempt with the broker's error; after the topic
    is created, POST /retry delivers it at the first attempt."""
    if kafka.broker is None and await asyncio.to_thread(kafka.auto_creates_topics):
        pytest.skip("the external broker auto-creates topics")
    topic = f"missing-{uuid.uuid4().hex[:12]}"
    fail_fast = {"topic.metadata.propagation.max.ms": 200, "message.timeout.ms": 2000}
    svc: Service = await service_factory(
        {
            "backends": {"kafka": kafka.settings(fail_fast)},
            "notifier": {"retry_schedule_seconds": [0.05, 0.05]},
        }
    )
    url = files.add("/late.txt", b"late topic\n")
    job_id = await svc.submit(**kafka_job(url, topic))
    job = await svc.wait_job(job_id, lambda p: p["callback_state"] == "Failed")
    assert "UNKNOWN_TOPIC" in job["delivery_error"], job["delivery_error"]
    assert "Unknown topic" in job["delivery_error"], job["delivery_error"]
    _status, body = await svc.get(f"/jobs/{job_id}/events")
    callback_events = [e for e in body["events"] if e["type"].startswith("callback.")]
    assert event_types(callback_events) == [
        "callback.attempted",
        "callback.retry_scheduled",
        "callback.attempted",
        "callback.retry_scheduled",
        "callback.attempted",
        "callback.failed",
    ]
    # the first attempt's error comes from the broker's metadata answer
    assert callback_events[1]["data"]["delivery_error"].startswith("UNKNOWN_TOPIC_OR_PART: Broker:")

    await asyncio.to_thread(create_topic, kafka.bootstrap, topic)
    status, _body = await svc.post(f"/retry/{job_id}")
    assert status == 201
    job = await svc.wait_job(job_id, lambda p: p["callback_state"] == "Success")
    assert job["callback_attempts"] == 1, job  # no stale "unknown topic" on the way
    [record] = (await read_topic(topic).keys({job_id}))[job_id]
    assert record.value == success_payload(job_id, url)
    assert record.header("event-id") == job["outcome_event_id"]


async def test_kafka_only_notifier_fails_http_callbacks_at_once(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    receiver: CallbackReceiver,
) -> None:
    """A notifier with only Kafka configured fails an HTTP callback at the first attempt, saying
    that HTTP is not enabled, and sends nothing."""
    svc: Service = await service_factory({"backends": {"http": None, "kafka": kafka.settings()}})
    url = files.add("/h.txt", b"http job\n")
    http_job = {**kafka_job(url, ""), "callback_type": "http", "callback_dst": receiver.url("/cb")}
    job_id = await svc.submit(**http_job)
    job = await svc.wait_job(job_id, lambda p: p["callback_state"] == "Failed")
    assert job["delivery_error"] == "callback_type 'http' is not enabled on this notifier"
    assert job["callback_attempts"] == 1
    assert receiver.received == []


async def test_http_only_notifier_fails_kafka_callbacks_at_once(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """A notifier with only HTTP configured fails a Kafka callback at the first attempt, saying
    that Kafka is not enabled, and produces nothing."""
    topic = await kafka.new_topic("http-only")
    svc: Service = await service_factory()  # the test config has backends.http only
    assert svc.config.backends.kafka is None
    job_id = await svc.submit(**kafka_job(files.add("/k.txt", b"kafka job\n"), topic))
    job = await svc.wait_job(job_id, lambda p: p["callback_state"] == "Failed")
    assert job["delivery_error"] == "callback_type 'kafka' is not enabled on this notifier"
    assert job["callback_attempts"] == 1
    assert await read_topic(topic).message_count() == 0


async def test_allowed_topics_deliver_inside_and_refuse_outside(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """With backends.kafka.allowed_topics set, the callback and export producers start (the key
    never reaches librdkafka), a callback to a topic under an allowed prefix is delivered and
    exported, and a POST naming another, an internal or the export topic is 400."""
    topic = await kafka.new_topic("allowed")
    export = await kafka.new_topic("export")
    svc: Service = await service_factory(
        {
            "backends": {"kafka": kafka.settings({"allowed_topics": ["allowed-*"]})},
            "events": {"kafka_topic": export},
        }
    )
    url = files.add("/allowed.txt", b"allowed topic\n")
    job_id = await svc.submit(**kafka_job(url, topic))
    await svc.wait_job(job_id, lambda p: p["callback_state"] == "Success")
    [record] = (await read_topic(topic).keys({job_id}))[job_id]
    assert record.value == success_payload(job_id, url)
    assert job_id in await read_topic(export).keys({job_id})
    for refused in (f"other-{uuid.uuid4().hex[:8]}", "__consumer_offsets", export):
        status, answer = await svc.post("/download", kafka_job(url, refused))
        assert (status, answer["field"]) == (400, "callback_dst"), (refused, answer)


async def test_callbacks_are_retried_through_a_broker_outage_and_delivered_after_it(
    kafka: Kafka,
    service_factory: ServiceFactory,
    files: FileServer,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """Callbacks attempted while the broker is stopped fail with librdkafka's error, are retried
    on the schedule, and are delivered once the broker is back."""
    broker = kafka.broker
    if broker is None:
        pytest.skip("stops the broker: needs the module's own, not KAFKA_BOOTSTRAP_SERVERS")
    topic = await kafka.new_topic("outage")
    settings = kafka.settings({"message.timeout.ms": 1000, "reconnect.backoff.max.ms": 250})
    svc: Service = await service_factory(
        {"backends": {"kafka": settings}, "notifier": {"retry_schedule_seconds": [0.5, 1, 2, 4]}}
    )
    url = files.add("/o.txt", b"outage\n")
    warm = await svc.submit(**kafka_job(url, topic))  # the producer is connected and has an id
    await svc.wait_job(warm, lambda p: p["callback_state"] == "Success")

    await asyncio.to_thread(broker.stop)
    try:
        ids = [await svc.submit(**kafka_job(url, topic, extra=f"o{i}")) for i in range(5)]
        for job_id in ids:  # each has failed an attempt and waits for its retry
            await svc.wait_job(job_id, lambda p: p["delivery_error"] != "")
    finally:
        await asyncio.to_thread(broker.start)

    for job_id in ids:
        job = await svc.wait_job(job_id, lambda p: p["callback_state"] == "Success", timeout=20)
        assert int(job["callback_attempts"]) >= 2, job
        _status, body = await svc.get(f"/jobs/{job_id}/events")
        failures = [e["data"] for e in body["events"] if e["type"] == "callback.retry_scheduled"]
        assert failures[0]["delivery_error"] == "_MSG_TIMED_OUT: Local: Message timed out"
        assert all(f["delivery_error"].startswith("_") for f in failures), failures  # librdkafka's
    records = await read_topic(topic).keys(set(ids))
    for i, job_id in enumerate(ids):
        assert {json.dumps(r.value) for r in records[job_id]} == {
            json.dumps(success_payload(job_id, url, f"o{i}"))
        }


async def test_sigkilled_notifier_with_messages_in_flight_loses_no_callback(
    kafka: Kafka,
    make_config: MakeConfig,
    spawn: Spawn,
    files: FileServer,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """Callbacks a notifier process had produced but not yet got reports for when it was
    SIGKILLed are all delivered by the next notifier, each with its payload and event id."""
    topic = await kafka.new_topic("sigkill")
    # the first notifier holds messages in librdkafka's queue for 10 s: in flight when killed
    holding = kafka.settings({"linger.ms": 10_000, "message.timeout.ms": 30_000})
    held_path, config = make_config(
        {"backends": {"kafka": holding}, "notifier": {"concurrency": 50}}, name="held.json"
    )
    path, _config = make_config(
        {"backends": {"kafka": kafka.settings()}, "notifier": {"concurrency": 50}}
    )
    log = EventTail(redis_client, Keys(config.redis.key_prefix, config.redis.shards))
    spawn("processor", path)
    first = spawn("notifier", held_path)
    api = await start_api(spawn, path, http)

    url = files.add("/k.txt", b"in flight\n")
    ids = [await api.submit(**kafka_job(url, topic, extra=f"k{i}")) for i in range(30)]
    await log.wait(lambda t: t.count("callback.attempted", ids) == 30, timeout_s=20)
    first.kill()
    await log.catch_up()
    assert log.count("callback.delivered", ids) == 0
    reader = read_topic(topic)
    assert await reader.message_count() == 0  # nothing had reached the broker

    spawn("notifier", path)
    await log.wait(lambda t: t.all_have("callback.delivered", ids), timeout_s=20)
    records = await reader.keys(set(ids))
    for i, job_id in enumerate(ids):
        job = await api.get(f"/jobs/{job_id}")
        assert job["callback_state"] == "Success"
        assert records[job_id], job_id
        for record in records[job_id]:
            assert record.value == success_payload(job_id, url, f"k{i}")
            assert record.header("event-id") == job["outcome_event_id"]


# -- the event export ----------------------------------------------------------------------------


async def test_event_export_is_complete_and_ordered_per_job_across_notifier_restarts(
    kafka: Kafka,
    make_config: MakeConfig,
    spawn: Spawn,
    files: FileServer,
    receiver: CallbackReceiver,
    redis_client: StrRedis,
    http: aiohttp.ClientSession,
    read_topic: Callable[[str], TopicReader],
) -> None:
    """With events.kafka_topic, every event of every job reaches the topic at least once, keyed
    by job id, and each job's first copies come in stream order, across a SIGTERM and a SIGKILL
    of the exporting notifier."""
    export = await kafka.new_topic("events", partitions=3)
    path, config = make_config(
        {"backends": {"kafka": kafka.settings()}, "events": {"kafka_topic": export}}
    )
    log = EventTail(redis_client, Keys(config.redis.key_prefix, config.redis.shards))
    reader = read_topic(export)
    spawn("processor", path)
    notifier = spawn("notifier", path)
    api = await start_api(spawn, path, http)
    url = files.add("/e.txt", b"exported\n")
    cb_url = receiver.url("/cb")

    async def batch(name: str, count: int = 8) -> list[str]:
        body = {**kafka_job(url, ""), "callback_type": "http", "callback_dst": cb_url}
        return [await api.submit(**body, extra=f"{name}{i}") for i in range(count)]

    # a graceful stop while the first batch is being exported
    first = await batch("a")
    await reader.until(lambda rs: any(r.key in first for r in rs))
    assert await asyncio.to_thread(notifier.terminate) == 0, notifier.log()
    notifier = spawn("notifier", path)
    # a crash while the second batch is being exported; the stopped notifier handed the export
    # lock over at once, so the new one exports well before the lock (10 s) would have expired
    second = await batch("b")
    await reader.until(lambda rs: any(r.key in second for r in rs), timeout_s=6)
    notifier.kill()
    assert notifier.popen is not None and notifier.popen.returncode == -signal.SIGKILL
    spawn("notifier", path)
    third = await batch("c")

    ids = first + second + third
    await log.wait(lambda t: t.all_have("file.deleted", ids), timeout_s=30)  # nothing more comes
    expected = {job_id: (await api.get(f"/jobs/{job_id}/events"))["events"] for job_id in ids}
    wanted = {e["id"] for events in expected.values() for e in events}
    await reader.until(lambda rs: wanted <= {r.header("event-id") for r in rs}, timeout_s=30)

    by_job: dict[str, list[Record]] = defaultdict(list)
    for r in reader.records:
        by_job[r.key].append(r)
    assert set(by_job) == set(ids)
    for job_id, events in expected.items():
        assert event_types(events)[-1] == "file.deleted"
        records = by_job[job_id]
        assert len({r.partition for r in records}) == 1  # one key, one partition: one order
        first_copies: dict[str, Record] = {}
        for r in records:
            assert r.value["id"] == r.header("event-id")
            first_copies.setdefault(r.value["id"], r)
        assert [r.value for r in first_copies.values()] == events
