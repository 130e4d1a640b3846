"""Kafka callbacks: produce the payload to topic `callback_dst`, keyed by job id, with the
event id in a header; delivered only when the broker's delivery report says so.

librdkafka's `produce` only queues; delivery reports arrive through `poll`, which a dedicated
thread runs so the event loop never blocks on the producer.

Which topics callers may name is checked at POST (models.check_kafka_topic) and again here, at
delivery, for callbacks accepted before the policy changed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from downloader.backends import Delivery, Payload
from downloader.config import kafka_topic_refusal

__all__ = ["OUR_PROPERTIES", "KafkaBackend", "producer_config"]

_DEFAULTS = {
    "message.timeout.ms": 30_000,
    "enable.idempotence": True,  # keeps per-partition order through retries
    "linger.ms": 0,  # a callback waits for its report: batching by time only adds latency
}


OUR_PROPERTIES = frozenset({"allowed_topics"})
"""Keys of `backends.kafka` that are ours, not librdkafka's (which refuses unknown ones)."""


def producer_config(properties: dict[str, Any]) -> dict[str, Any]:
    """librdkafka properties from `backends.kafka`, over our defaults, without ours."""
    librdkafka = {k: v for k, v in properties.items() if k not in OUR_PROPERTIES}
    return {**_DEFAULTS, **librdkafka}


def _settle(future: asyncio.Future[str], reason: str) -> None:
    if not future.done():
        future.set_result(reason)


class PollingProducer:
    """A confluent-kafka Producer whose delivery reports resolve asyncio futures."""

    def __init__(self, properties: dict[str, Any]) -> None:
        self.config = producer_config(properties)
        timeout_ms = float(self.config["message.timeout.ms"])
        # 0 means "retry until delivered" in librdkafka: then we wait as long as it takes.
        self.timeout_s: float | None = timeout_ms / 1000 + 5 if timeout_ms > 0 else None
        self.producer: Producer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refreshes: dict[str, asyncio.Future[None]] = {}

    def start(self) -> None:
        self.producer = Producer(self.config)
        self._thread = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        assert self.producer is not None
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def produce(
        self, topic: str, key: str, value: bytes, headers: list[tuple[str, str | bytes | None]]
    ) -> str:
        """Produce one message and wait for its delivery report: '' when delivered, else why not."""
        assert self.producer is not None, "start() first"
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def report(err: KafkaError | None, _msg: Message) -> None:
            reason = "" if err is None else f"{err.name()}: {err.str()}"
            loop.call_soon_threadsafe(_settle, done, reason)

        for refreshed in (False, True):
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=report
                )
                break
            except BufferError:
                return "the local producer queue is full (queue.buffering.max.messages)"
            except KafkaException as exc:
                err = exc.args[0]
                if refreshed or err.code() != KafkaError._UNKNOWN_TOPIC:
                    return f"{err.name()}: {err.str()}"
            # librdkafka remembers that a topic does not exist until its next metadata refresh
            # (topic.metadata.refresh.interval.ms, 5 minutes): ask the broker now, so that a
            # topic created since (say, before a POST /retry) is used at once.
            await self._refresh_metadata(topic)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout_s)
        except TimeoutError:
            return "no delivery report within message.timeout.ms"

    async def _refresh_metadata(self, topic: str) -> None:
        """One metadata request for `topic` at a time, shared by every caller meanwhile (a batch
        of the event export to a missing topic asks once, not once per event)."""
        refresh = self._refreshes.get(topic)
        if refresh is None:
            refresh = asyncio.ensure_future(asyncio.to_thread(self._list_topic, topic))
            self._refreshes[topic] = refresh
            refresh.add_done_callback(lambda _f: self._refreshes.pop(topic, None))
        await asyncio.shield(refresh)

    def _list_topic(self, topic: str) -> None:
        assert self.producer is not None
        with contextlib.suppress(KafkaException):
            self.producer.list_topics(topic, timeout=min(5.0, self.timeout_s or 5.0))

    def close(self, timeout_s: float) -> int:
        """Flush within `timeout_s`; returns how many messages never got a report."""
        left = 0
        if self.producer is not None:
            left = self.producer.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        return int(left)


class KafkaBackend:
    name = "kafka"

    def __init__(self, properties: dict[str, Any], export_topic: str | None = None) -> None:
        """`properties`: backends.kafka (`allowed_topics` is ours, not librdkafka's);
        `export_topic`: events.kafka_topic, never a callback's destination."""
        self.producer = PollingProducer(properties)
        self.allowed_topics = tuple(properties.get("allowed_topics", ()))
        self.export_topic = export_topic

    async def start(self) -> None:
        await asyncio.to_thread(self.producer.start)

    async def deliver(
        self, job_id: str, event_id: str, destination: str, payload: Payload, tenant: str = ""
    ) -> Delivery:
        # checked at POST too; this catches callbacks accepted before the policy changed
        if why := kafka_topic_refusal(destination, self.allowed_topics, self.export_topic):
            return Delivery(False, f"topic {destination!r} {why}", permanent=True)
        value = json.dumps(payload, separators=(",", ":")).encode()
        error = await self.producer.produce(
            destination, job_id, value, [("event-id", event_id.encode())]
        )
        return Delivery(not error, error)

    async def close(self, timeout_s: float) -> None:
        await asyncio.to_thread(self.producer.close, timeout_s)
