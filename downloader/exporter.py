"""Event export: every job event, in stream order, to a Kafka topic (key = job id), at least once.

One exporter runs at a time (a lock in Redis, renewed with every batch); it resumes from the
last position it recorded, which it advances only after the broker acknowledged the batch. A
crash between the acknowledgement and the record sends the batch again: consumers see each
event at least once, in order per job.

The exporter has a producer of its own with `message.timeout.ms: 0` (retry until delivered):
with a timeout, an outage could fail some messages of a batch while later ones of the same job
get through, and resending would then put an event after its successors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from downloader.backends.kafka import PollingProducer
from downloader.errors import StorageUnavailable
from downloader.events import parse_event
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
        self._holding = False

    async def start(self) -> None:
        await asyncio.to_thread(self.producer.start)

    async def close(self, timeout_s: float) -> None:
        await asyncio.to_thread(self.producer.close, timeout_s)

    async def step(self) -> None:
        """Hold the lock, export one batch (or wait for one), record the position."""
        try:
            await self._export_batch()
        except asyncio.CancelledError:
            # The notifier is stopping: hand the lock over now, not lock_ms later. Whatever was
            # produced but not recorded is sent again by the next exporter (at least once).
            if self._holding:
                with contextlib.suppress(StorageUnavailable, TimeoutError):
                    await asyncio.wait_for(self.storage.export_hold(self.owner, "", 1), 1.0)
            raise

    async def _export_batch(self) -> None:
        self._holding = await self.storage.export_hold(self.owner, "", self.lock_ms)
        if not self._holding:
            await asyncio.sleep(self.lock_ms / 4000)
            return
        position = await self.storage.export_position()
        entries = await self.storage.read_events(position, self.batch, block_ms=self.lock_ms // 4)
        if not entries:
            return
        sends = []
        for entry_id, fields in entries:
            event = parse_event(entry_id, fields)
            value = json.dumps(event.as_json(), separators=(",", ":")).encode()
            headers: list[tuple[str, str | bytes | None]] = [("event-id", entry_id.encode())]
            sends.append(self.producer.produce(self.topic, event.job_id, value, headers))
        errors = [e for e in await asyncio.gather(*sends) if e]
        if errors:
            log.warning("event export failed, will resend", error=errors[0], batch=len(entries))
            await asyncio.sleep(1)
            return
        self._holding = await self.storage.export_hold(self.owner, entries[-1][0], self.lock_ms)
        if self._holding:
            self.exported += len(entries)
