"""Self-check of harness/kafka_broker.py: start, produce, consume, restart, timings."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, KafkaError, Message, Producer  # noqa: E402

from harness.kafka_broker import (  # noqa: E402
    KAFKA_VERSION,
    KafkaBroker,
    default_cache_dir,
    kafka_available,
    kafka_classpath,
)

QUIET = {"log_level": 0}


def produce(bootstrap: str, topic: str, value: bytes) -> None:
    """Produce one message and wait for its delivery report."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **QUIET})
    producer.produce(topic, value, on_delivery=on_delivery)
    left = producer.flush(15)
    if left or errors:
        raise SystemExit(f"produce failed: left={left} errors={errors}")


def consume(bootstrap: str, topic: str, group: str, count: int, timeout: float = 30) -> list[bytes]:
    """Consume ``count`` messages with ``group`` from the committed offset (or earliest)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **QUIET,
        }
    )
    consumer.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg: Message | None = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                raise SystemExit(f"consume error: {msg.error()}")
            out.append(msg.value() or b"")
            consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()
    if len(out) < count:
        raise SystemExit(f"consumed {len(out)}/{count} messages from {topic} in {timeout}s")
    return out


def timed(label: str, timings: dict[str, float], t0: float) -> None:
    """Record and print the seconds since ``t0``."""
    timings[label] = time.monotonic() - t0
    print(f"  {label:<28} {timings[label]:6.2f}s", flush=True)


def main() -> int:
    """Run the check; exit code 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()

    ok, why = kafka_available()
    if not ok:
        print(f"SKIP: {why}")
        return 2
    print(f"Kafka {KAFKA_VERSION}, cache {args.cache_dir}")
    t: dict[str, float] = {}

    t0 = time.monotonic()
    kafka_classpath(args.cache_dir)
    timed("classpath (fetch or cached)", t, t0)

    broker = KafkaBroker(cache_dir=args.cache_dir)
    try:
        t0 = time.monotonic()
        broker.start()
        timed("start (format + boot)", t, t0)
        print(f"    {broker.bootstrap_servers} pid={broker.pid} timings={broker.timings}")
        bs = broker.bootstrap_servers
        topic = f"check-{uuid.uuid4().hex[:8]}"

        t0 = time.monotonic()
        broker.create_topic(topic, partitions=3)
        timed("create_topic", t, t0)

        t0 = time.monotonic()
        produce(bs, topic, b"one")
        timed("produce #1", t, t0)

        t0 = time.monotonic()
        got = consume(bs, topic, "g1", 1)
        assert got == [b"one"], got
        timed("consume #1 (new group)", t, t0)

        pid = broker.pid
        t0 = time.monotonic()
        broker.restart()
        timed("restart (graceful)", t, t0)
        assert broker.bootstrap_servers == bs and broker.pid != pid

        t0 = time.monotonic()
        got = consume(bs, topic, "g2", 1)
        assert got == [b"one"], got
        timed("consume after restart", t, t0)

        produce(bs, topic, b"two")
        got = consume(bs, topic, "g1", 1)  # committed offset survived the restart
        assert got == [b"two"], got

        t0 = time.monotonic()
        broker.restart(hard=True)
        timed("restart (SIGKILL)", t, t0)
        got = consume(bs, topic, "g3", 2)
        assert sorted(got) == [b"one", b"two"], got
        timed("consume after SIGKILL", t, t0)

        t0 = time.monotonic()
        broker.delete_topic(topic)
        timed("delete_topic", t, t0)

        pid = broker.pid
        t0 = time.monotonic()
        broker.stop()
        timed("stop", t, t0)
        assert pid is not None and not Path(f"/proc/{pid}").exists(), "JVM still alive"
    finally:
        broker.close()
    assert not broker.work_dir.exists()
    print("kafka_broker_check: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
