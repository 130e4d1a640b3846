"""Which Kafka topics callers may name in `callback_dst`: never an internal topic (`_*`, which
covers Kafka's own `__*`) nor the event export topic; with `backends.kafka.allowed_topics`, only
the topics it lists or prefixes. Checked at POST and again at delivery; `allowed_topics` is ours
and never reaches librdkafka. (Delivery to an allowed topic through a real broker:
tests/test_kafka.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from downloader.backends.kafka import KafkaBackend, PollingProducer, producer_config
from downloader.config import Config, load_config
from downloader.errors import ConfigError
from harness.redis_nodes import StrRedis, data_keys
from harness.servers import free_port
from tests.conftest import Service

ServiceFactory = Callable[..., Any]
EXPORT = "dl.events"
NO_BROKER = {"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 2000}
"""Producer settings for tests that never reach a broker (librdkafka connects lazily)."""


def kafka_body(topic: str) -> dict[str, Any]:
    return {
        "aggr_id": "topics",
        "aggr_limit": 2,
        "url": "http://origin.test/f",
        "callback_type": "kafka",
        "callback_dst": topic,
    }


def kafka_settings(allowed: list[str] | None) -> dict[str, Any]:
    """A config patch: a Kafka backend (with `allowed` as allowed_topics) and the export."""
    props: dict[str, Any] = dict(NO_BROKER)
    if allowed is not None:
        props["allowed_topics"] = allowed
    return {"backends": {"kafka": props}, "events": {"kafka_topic": EXPORT}}


# -- at POST -------------------------------------------------------------------------------------

ORDERS = ["orders.*", "billing"]
REFUSED = [
    pytest.param(
        ORDERS,
        "__consumer_offsets",
        "is an internal topic (a name starting with _)",
        id="internal-offsets",
    ),
    pytest.param(
        ORDERS,
        "__transaction_state",
        "is an internal topic (a name starting with _)",
        id="internal-txn",
    ),
    pytest.param(
        None,
        "__consumer_offsets",
        "is an internal topic (a name starting with _)",
        id="internal-no-list",
    ),
    pytest.param(
        None, "_schemas", "is an internal topic (a name starting with _)", id="underscore-no-list"
    ),
    pytest.param(None, EXPORT, "is the service's event export topic", id="export-no-list"),
    pytest.param(["dl.*"], EXPORT, "is the service's event export topic", id="export-in-prefix"),
    pytest.param(ORDERS, "payments", "is not one of the allowed topics", id="outside"),
    pytest.param(ORDERS, "orders", "is not one of the allowed topics", id="prefix-needs-rest"),
    pytest.param(ORDERS, "billing.eu", "is not one of the allowed topics", id="name-not-prefix"),
    pytest.param(ORDERS, "Orders.eu", "is not one of the allowed topics", id="case-sensitive"),
]


@pytest.mark.parametrize(("allowed", "topic", "why"), REFUSED)
async def test_refused_topic_is_400_naming_callback_dst_and_stores_nothing(
    service_factory: ServiceFactory,
    redis_client: StrRedis,
    allowed: list[str] | None,
    topic: str,
    why: str,
) -> None:
    """A Kafka callback to an internal topic, the export topic, or a topic outside
    allowed_topics answers 400 naming callback_dst and stores nothing."""
    api: Service = await service_factory(kafka_settings(allowed), {"api"})
    status, answer = await api.post("/download", kafka_body(topic))
    assert status == 400, answer
    assert answer["field"] == "callback_dst"
    assert answer["error"] == f"callback_dst {topic!r} {why}"
    assert await data_keys(redis_client) == []


ACCEPTED = [
    pytest.param(ORDERS, "orders.eu", id="by-prefix"),
    pytest.param(ORDERS, "orders.", id="prefix-itself"),
    pytest.param(ORDERS, "billing", id="by-name"),
    pytest.param(["orders*"], "orders_v2", id="prefix-without-dot"),
    pytest.param(None, "payments", id="no-list"),
    pytest.param([], "payments", id="empty-list"),
    pytest.param(None, "dl_events", id="like-export-but-not-it"),
]


@pytest.mark.parametrize(("allowed", "topic"), ACCEPTED)
async def test_allowed_topic_is_accepted(
    service_factory: ServiceFactory, allowed: list[str] | None, topic: str
) -> None:
    """A topic that allowed_topics matches (by name or prefix), or any non-internal topic but
    the export one when there is no list, is accepted and stored as the callback_dst."""
    api: Service = await service_factory(kafka_settings(allowed), {"api"})
    job = await api.job(await api.submit(**kafka_body(topic)))
    assert (job["callback_type"], job["callback_dst"]) == ("kafka", topic)


async def test_internal_topic_is_refused_without_a_kafka_backend(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """An API without backends.kafka refuses an internal topic too."""
    api: Service = await service_factory(None, {"api"})
    status, answer = await api.post("/download", kafka_body("__consumer_offsets"))
    assert (status, answer["field"]) == (400, "callback_dst"), answer
    assert await data_keys(redis_client) == []


# -- configuration -------------------------------------------------------------------------------


def load(tmp_path: Path, raw: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return load_config(path, environ=environ or {})


def test_allowed_topics_never_reach_librdkafka(tmp_path: Path) -> None:
    """allowed_topics is read from backends.kafka and left out of the producer's properties."""
    config = load(tmp_path, {"backends": {"kafka": {**NO_BROKER, "allowed_topics": ["a.*"]}}})
    assert config.backends.kafka_allowed_topics == ("a.*",)
    assert config.backends.kafka is not None
    properties = producer_config(config.backends.kafka)
    assert "allowed_topics" not in properties
    assert properties["bootstrap.servers"] == NO_BROKER["bootstrap.servers"]


def test_allowed_topics_from_the_environment(tmp_path: Path) -> None:
    """DOWNLOADER__BACKENDS__KAFKA__ALLOWED_TOPICS takes a JSON list."""
    env = {"DOWNLOADER__BACKENDS__KAFKA__ALLOWED_TOPICS": '["orders.*", "billing"]'}
    config = load(tmp_path, {"backends": {"kafka": NO_BROKER}}, env)
    assert config.backends.kafka_allowed_topics == ("orders.*", "billing")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": "orders.*"}}},
            "backends.kafka: allowed_topics must be a list of topic names or prefixes followed "
            "by *",
            id="not-a-list",
        ),
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": ["ok", 5]}}},
            "backends.kafka: allowed_topics must be a list",
            id="not-strings",
        ),
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": ["orders/*"]}}},
            "backends.kafka: allowed_topics: 'orders/*' is not a topic name",
            id="bad-char",
        ),
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": ["*"]}}},
            "backends.kafka: allowed_topics: '*' is not a topic name",
            id="bare-star",
        ),
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": ["a*b"]}}},
            "backends.kafka: allowed_topics: 'a*b' is not a topic name",
            id="inner-star",
        ),
        pytest.param(
            {"backends": {"kafka": {"allowed_topics": ["__consumer_offsets"]}}},
            "backends.kafka: allowed_topics: '__consumer_offsets' names internal topics",
            id="internal",
        ),
        pytest.param(
            {
                "backends": {"kafka": {"allowed_topics": ["orders.*", EXPORT]}},
                "events": {"kafka_topic": EXPORT},
            },
            f"backends.kafka.allowed_topics names the event export topic {EXPORT!r}",
            id="export",
        ),
        pytest.param(
            {"backends": {"kafka": {}}, "events": {"kafka_topic": "__consumer_offsets"}},
            "events.kafka_topic: '__consumer_offsets' is one of Kafka's internal topics",
            id="export-internal",
        ),
        pytest.param(
            {"backends": {"kafka": {}}, "events": {"kafka_topic": "dl events"}},
            "events.kafka_topic: must be a Kafka topic name",
            id="export-bad-name",
        ),
    ],
)
def test_bad_topic_settings_stop_the_config_naming_the_key(
    tmp_path: Path, raw: dict[str, Any], message: str
) -> None:
    """A bad allowed_topics or events.kafka_topic is a config error naming the key."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, raw)
    assert message in str(err.value), str(err.value)


# -- the producers, with librdkafka (no broker needed) -------------------------------------------


async def test_producers_start_with_allowed_topics_configured() -> None:
    """The callback and export producers start (librdkafka accepts their properties) when
    backends.kafka holds allowed_topics."""
    props = {**NO_BROKER, "bootstrap.servers": f"127.0.0.1:{free_port()}"}
    for producer in (
        PollingProducer({**props, "allowed_topics": ["orders.*"]}),
        PollingProducer({**props, "allowed_topics": [], "message.timeout.ms": 0}),
    ):
        producer.start()
        assert producer.producer is not None
        assert producer.close(0) == 0


@pytest.mark.parametrize(
    "topic",
    ["__consumer_offsets", "_schemas", "payments", "orders.events"],
    ids=["internal", "underscore", "out", "export"],
)
async def test_backend_refuses_a_topic_outside_the_policy_at_delivery(topic: str) -> None:
    """A callback accepted before the policy changed, to a topic it now refuses (the event
    export's topic too, once events.kafka_topic names it), fails for good at delivery without
    being produced."""
    backend = KafkaBackend({**NO_BROKER, "allowed_topics": ["orders.*"]}, "orders.events")
    await backend.start()
    try:
        result = await backend.deliver("job1", "1-0", topic, {"job_id": "job1"})
    finally:
        await backend.close(0)
    assert (result.delivered, result.permanent) == (False, True)
    assert result.error.startswith(f"topic {topic!r} is ")
