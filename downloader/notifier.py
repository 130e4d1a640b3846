"""The notifier: delivers callbacks from the callbacks stream (a consumer group), retries them
on the configured schedule, and reclaims what a dead notifier left unsettled (at least once)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from downloader import metrics
from downloader.backends import Backend, Delivery, Payload
from downloader.backoff import callback_retry_delay_s
from downloader.config import Config
from downloader.errors import StorageUnavailable
from downloader.exporter import EventExporter
from downloader.heartbeat import publish_stats
from downloader.jobs import CallbackJob
from downloader.log import get_logger
from downloader.resilience import forever
from downloader.storage import Storage
from downloader.vocabulary import CallbackOutcome, DownloadState

__all__ = ["Notifier", "callback_payload"]

log = get_logger(__name__)


def callback_payload(job: CallbackJob) -> Payload:
    """The callback body of SPEC §4."""
    success = job.download_state is DownloadState.SUCCESS
    return {
        "success": success,
        "error": "" if success else job.error,
        "extra": job.extra,
        "resource_url": job.url,
        "download_url": job.download_url if success else "",
        "job_id": job.id,
        "response_code": job.response_code,
        "delivered": True,
        "delivery_error": "",
        "image_size": job.image_size if success else "",
    }


class Notifier:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        instance: str,
        backends: dict[str, Backend],
        exporter: EventExporter | None = None,
    ) -> None:
        if not backends:
            raise ValueError("no callback backend configured (backends.http or backends.kafka)")
        self.cfg = config.notifier
        self.storage = storage
        self.consumer = instance
        self.backends = backends
        self.exporter = exporter
        self.successful = 0
        self.failed = 0
        self.retried = 0
        self._slots = asyncio.Semaphore(self.cfg.concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}  # stream entry id -> delivery
        self._timer_kick = asyncio.Event()
        self._stopping = False

    def stats(self) -> dict[str, int]:
        return {
            "successfulCallbacks": self.successful,
            "failedCallbacks": self.failed,
            "retriedCallbacks": self.retried,
            "inFlight": len(self._inflight),
        }

    async def run(self, stop: asyncio.Event) -> None:
        for backend in self.backends.values():
            await backend.start()
        if self.exporter is not None:
            await self.exporter.start()
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("consume", self._consume_step),
            ("reclaim", self._reclaim_step),
            ("timer", self._timer_step),
            (
                "stats",
                lambda: publish_stats(
                    self.storage, "notifier", self.consumer, self.stats, self.cfg.stats_interval
                ),
            ),
        ]
        if self.exporter is not None:
            steps.append(("export", self.exporter.step))
        loops = [
            asyncio.create_task(forever(name, step, lambda: self._stopping), name=name)
            for name, step in steps
        ]
        log.info("notifier started", instance=self.consumer, backends=sorted(self.backends))
        try:
            await stop.wait()
        finally:
            self._stopping = True
            self._timer_kick.set()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._inflight:
                # Unfinished entries stay pending in the group: another notifier reclaims them.
                _done, pending = await asyncio.wait(
                    self._inflight.values(), timeout=self.cfg.shutdown_grace_seconds
                )
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for backend in self.backends.values():
                await backend.close(self.cfg.shutdown_grace_seconds)
            if self.exporter is not None:
                await self.exporter.close(self.cfg.shutdown_grace_seconds)
            log.info("notifier stopped", instance=self.consumer)

    async def _consume_step(self) -> None:
        await self.storage.ensure_callback_group()
        while not self._stopping:
            await self._slots.acquire()  # wait for room before taking entries off the stream
            self._slots.release()
            room = max(1, self.cfg.concurrency - len(self._inflight))
            for entry_id, job_id in await self.storage.read_callbacks(self.consumer, room, 2000):
                await self._spawn(entry_id, job_id)

    async def _reclaim_step(self) -> None:
        await asyncio.sleep(self.cfg.claim_idle_ms / 2000)
        for entry_id, job_id in await self.storage.reclaim_callbacks(
            self.consumer, self.cfg.claim_idle_ms, self.cfg.concurrency
        ):
            if entry_id not in self._inflight:
                log.info("reclaimed a callback left by another notifier", job_id=job_id)
                await self._spawn(entry_id, job_id)

    async def _timer_step(self) -> None:
        _moved, next_ms = await self.storage.promote_callbacks()
        self._timer_kick.clear()
        wait_ms = 1000.0 if next_ms < 0 else max(1.0, min(float(next_ms), 1000.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._timer_kick.wait(), wait_ms / 1000)

    async def _spawn(self, entry_id: str, job_id: str) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._deliver(entry_id, job_id), name=f"callback:{job_id}")
        self._inflight[entry_id] = task

        def done(_t: asyncio.Task[None]) -> None:
            self._inflight.pop(entry_id, None)
            self._slots.release()

        task.add_done_callback(done)

    async def _deliver(self, entry_id: str, job_id: str) -> None:
        try:
            await self._attempt(entry_id, job_id)
        except StorageUnavailable as exc:
            # The entry stays pending; reclaim picks it up once Redis is back.
            log.warning(
                "redis down during a callback; it will be reclaimed", job_id=job_id, error=str(exc)
            )

    async def _attempt(self, entry_id: str, job_id: str) -> None:
        job = await self.storage.callback_begin(job_id)
        if job is None:
            await self.storage.callback_skip(entry_id)
            return
        attempt = job.callback_attempts
        backend = self.backends.get(job.callback_type)
        started = time.perf_counter()
        if backend is None:
            result = Delivery(
                False,
                f"callback_type {job.callback_type!r} is not enabled on this notifier",
                permanent=True,
            )
        else:
            result = await backend.deliver(
                job.id, job.outcome_event_id, job.callback_dst, callback_payload(job)
            )
        metrics.CALLBACK_SECONDS.labels(job.callback_type).observe(time.perf_counter() - started)
        data: dict[str, Any] = {"attempt": attempt}
        delay_s = None
        if result.delivered:
            outcome, delay_ms = CallbackOutcome.DELIVERED, int(self.cfg.deletion_interval * 60_000)
            self.successful += 1
        else:
            if not result.permanent:
                delay_s = callback_retry_delay_s(attempt, self.cfg.retry_schedule_seconds)
            data["delivery_error"] = result.error
            if delay_s is None:
                outcome, delay_ms = CallbackOutcome.FAILED, 0
                self.failed += 1
            else:
                outcome, delay_ms = CallbackOutcome.RETRY, int(delay_s * 1000)
                data["retry_in_ms"] = delay_ms
                self.retried += 1
        metrics.CALLBACKS.labels(job.callback_type, outcome).inc()
        await self.storage.callback_end(job_id, outcome, data, entry_id, delay_ms)
        if outcome is CallbackOutcome.RETRY:
            self._timer_kick.set()
        ids = {"job_id": job.id, "aggr_id": job.aggr_id, "attempt": attempt}
        if outcome is CallbackOutcome.DELIVERED:
            log.info("callback delivered", **ids, callback_type=job.callback_type)
        elif outcome is CallbackOutcome.RETRY:
            log.info("callback retry scheduled", **ids, error=result.error, retry_in_ms=delay_ms)
        else:
            log.info("callback failed", **ids, error=result.error)
