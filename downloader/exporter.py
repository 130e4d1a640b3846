"""Event export: every job event, in stream order, to a Kafka topic (key = job id), at least once.

Each shard's events are exported by one exporter at a time (a lock per shard in Redis, renewed
with every batch; a job's events are all in its shard, so they stay in order); it resumes from
the last position it recorded, which it advances only after the broker acknowledged the batch. A
crash between the acknowledgement and the record sends the batch again: consumers see each
event at least once, in order per job.

The exporter has a producer of its own with `message.timeout.ms: 0` (retry until delivered):
with a timeout, an outage could fail some messages of a batch while later ones of the same job
get through, and resending would then put an event after its successors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from downloader.backends.kafka import PollingProducer
from downloader.errors import StorageUnavailable
from downloader.log import get_logger
from downloader.storage import Storage

__all__ = ["EventExporter"]

log = get_logger(__name__)


class EventExporter:
    def __init__(
        self,
        storage: Storage,
        kafka_properties: dict[str, Any],
        topic: str,
        owner: str,
        lock_ms: int = 10_000,
        batch: int = 500,
    ) -> None:
        self.storage = storage
        self.producer = PollingProducer({**kafka_properties, "message.timeout.ms": 0})
        self.topic = topic
        self.owner = owner
        self.lock_ms = lock_ms
        self.batch = batch
        self.exported = 0
        self._holding: set[int] = set()  # shards whose export lock this exporter holds

    async def start(self) -> None:
        await asyncio.to_thread(self.producer.start)

    async def close(self, timeout_s: float) -> None:
        await asyncio.to_thread(self.producer.close, timeout_s)

    def steps(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """One loop per shard: each shard's events are exported in order under a lock of its
        own, so the shards' exports run side by side (in one notifier or spread over several)."""
        return [
            (f"export-{s}", functools.partial(self.step, s)) for s in range(self.storage.shards)
        ]

    async def step(self, shard: int) -> None:
        """Hold the shard's lock, export one batch (or wait for one), record the position."""
        try:
            await self._export_batch(shard)
        except asyncio.CancelledError:
            # The notifier is stopping: hand the lock over now, not lock_ms later. Whatever was
            # produced but not recorded is sent again by the next exporter (at least once).
            if shard in self._holding:
                with contextlib.suppress(StorageUnavailable, TimeoutError):
                    await asyncio.wait_for(self.storage.export_hold(shard, self.owner, "", 1), 1.0)
            raise

    async def _export_batch(self, shard: int) -> None:
        if await self.storage.export_hold(shard, self.owner, "", self.lock_ms):
            self._holding.add(shard)
        else:
            self._holding.discard(shard)
            await asyncio.sleep(self.lock_ms / 4000)
            return
        position = await self.storage.export_position(shard)
        events = await self.storage.read_events(
            shard, position, self.batch, block_ms=self.lock_ms // 4
        )
        if not events:
            return
        sends = []
        for event in events:
            value = json.dumps(event.as_json(), separators=(",", ":")).encode()
            headers: list[tuple[str, str | bytes | None]] = [("event-id", event.id.encode())]
            sends.append(self.producer.produce(self.topic, event.job_id, value, headers))
        errors = [e for e in await asyncio.gather(*sends) if e]
        if errors:
            log.warning("event export failed, will resend", error=errors[0], batch=len(events))
            await asyncio.sleep(1)
            return
        if await self.storage.export_hold(shard, self.owner, events[-1].id, self.lock_ms):
            self.exported += len(events)
        else:
            self._holding.discard(shard)
