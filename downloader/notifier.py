"""The notifier: delivers callbacks from the callbacks stream (a consumer group), retries them
on the configured schedule, and takes over what a gone notifier left unsettled (at least once).

Each notifier is a consumer of the group named by its instance id and keeps a liveness key
(heartbeat.Liveness). Every `heartbeat_ms` each one takes over the pending entries of consumers
whose key is missing (callback_takeover.lua); the entries of a live notifier, however slow its
receivers, are never taken. Every `dead_after_ms` each one also looks through its own pending
entries and delivers again those no delivery holds: a settling write lost with a failed-over
master leaves its entry pending with a live notifier, and nobody else would take it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from downloader import metrics
from downloader.backends import Backend, Delivery, Payload
from downloader.backoff import callback_retry_delay_s
from downloader.config import Config
from downloader.errors import StorageUnavailable
from downloader.exporter import EventExporter
from downloader.heartbeat import Liveness, publish_stats
from downloader.jobs import CallbackJob
from downloader.log import get_logger
from downloader.redact import scrub, secrets_of
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
        self.security = config.security
        self.storage = storage
        self.consumer = instance
        self.backends = backends
        self.exporter = exporter
        self.successful = 0
        self.failed = 0
        self.retried = 0
        self._slots = asyncio.Semaphore(self.cfg.concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}  # stream entry id -> delivery
        self._held: set[str] = set()  # entry ids read or taken over, not yet settled or given up
        self._orphaned = False  # a delivery ended without settling its entry (Redis error)
        self._swept_at = time.monotonic()  # own pending entries last looked through
        self._timer_kick = asyncio.Event()
        self._stopping = False
        self.liveness = Liveness(
            storage, "notifier", instance, self.cfg.heartbeat_ms, self.cfg.dead_after_ms
        )

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
        # beats on through the shutdown grace (cancelled after it): the deliveries finishing
        # then must not be taken over
        heartbeat = asyncio.create_task(
            forever("heartbeat", self.liveness.step, lambda: False), name="heartbeat"
        )
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (f"consume-{group[0]}", functools.partial(self._consume_step, group))
            for group in self.storage.shard_groups()
        ]
        steps += [
            ("takeover", self._takeover_step),
            ("timer", self._timer_step),
            (
                "stats",
                lambda: publish_stats(
                    self.storage, "notifier", self.consumer, self.stats, self.cfg.stats_interval
                ),
            ),
        ]
        if self.exporter is not None:
            steps += self.exporter.steps()
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
                # Still beating: the deliveries finishing within the grace stay ours.
                _done, pending = await asyncio.wait(
                    self._inflight.values(), timeout=self.cfg.shutdown_grace_seconds
                )
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # What is left unsettled stays pending in the group; without our liveness key the
            # other notifiers take it over at their next beat.
            with contextlib.suppress(StorageUnavailable):
                await self.liveness.stop()
            for backend in self.backends.values():
                await backend.close(self.cfg.shutdown_grace_seconds)
            if self.exporter is not None:
                await self.exporter.close(self.cfg.shutdown_grace_seconds)
            log.info("notifier stopped", instance=self.consumer)

    async def _consume_step(self, shards: list[int]) -> None:
        """Read new callback entries of `shards` (one of storage.shard_groups()) as room frees."""
        await self.storage.ensure_callback_groups(shards)
        await self.liveness.started.wait()  # a consumer without a liveness key looks gone
        groups = len(self.storage.shard_groups())  # each reads at once: share the room
        while not self._stopping:
            await self._slots.acquire()  # wait for room before taking entries off the stream
            self._slots.release()
            room = max(1, (self.cfg.concurrency - len(self._held)) // groups)
            for shard, entry_id, job_id in await self.storage.read_callbacks(
                shards, self.consumer, room, 2000
            ):
                await self._spawn(shard, entry_id, job_id)

    async def _takeover_step(self) -> None:
        """Every heartbeat: take over the entries of gone notifiers (as many as there is room
        for), and deliver again our own entries that a Redis error left unsettled."""
        await asyncio.sleep(self.cfg.heartbeat_ms / 1000)
        if time.monotonic() - self._swept_at >= self.cfg.dead_after_ms / 1000:
            self._orphaned = True
        if self._orphaned:
            await self._adopt_orphans()
        if not self.liveness.may_judge_others():
            return
        room = max(0, self.cfg.concurrency - len(self._held))
        for gone in await self.storage.take_over_callbacks(self.consumer, room):
            if gone.entries:
                log.info(
                    "took over callbacks of a gone notifier",
                    notifier=gone.consumer,
                    callbacks=len(gone.entries),
                )
            for entry_id, job_id in gone.entries:
                await self._spawn(gone.shard, entry_id, job_id)

    async def _adopt_orphans(self) -> None:
        """Spawn a delivery for each entry of ours that no delivery holds (callback_begin skips
        one settled meanwhile)."""
        self._orphaned = False
        self._swept_at = time.monotonic()
        try:
            for shard in self.storage.all_shards:
                after = "0-0"
                while rows := await self.storage.read_callbacks(
                    [shard], self.consumer, 100, 0, after=after
                ):
                    for _s, entry_id, job_id in rows:
                        await self._spawn(shard, entry_id, job_id)
                    after = rows[-1][1]
        except BaseException:
            self._orphaned = True
            raise

    async def _timer_step(self) -> None:
        """Put due callback retries of every shard back on their streams; sleep until the
        next one is due (at most 1 s)."""
        promoted = await asyncio.gather(
            *(self.storage.promote_callbacks(s) for s in self.storage.all_shards)
        )
        due = [ms for _moved, ms in promoted if ms >= 0]
        self._timer_kick.clear()
        wait_ms = max(1.0, min([1000.0, *map(float, due)]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._timer_kick.wait(), wait_ms / 1000)

    async def _spawn(self, shard: int, entry_id: str, job_id: str) -> None:
        held = f"{shard}/{entry_id}"  # entry ids are unique per shard's stream
        if held in self._held:  # read and found again as an orphan: one delivery
            return
        self._held.add(held)
        try:
            await self._slots.acquire()
        except BaseException:
            self._held.discard(held)
            raise
        task = asyncio.create_task(
            self._deliver(shard, entry_id, job_id), name=f"callback:{job_id}"
        )
        self._inflight[held] = task

        def done(_t: asyncio.Task[None]) -> None:
            self._inflight.pop(held, None)
            self._held.discard(held)
            self._slots.release()

        task.add_done_callback(done)

    async def _deliver(self, shard: int, entry_id: str, job_id: str) -> None:
        try:
            if not job_id:  # the entry is gone from the stream
                await self.storage.callback_skip(shard, entry_id)
                return
            await self._attempt(shard, entry_id, job_id)
        except StorageUnavailable as exc:
            # The entry stays pending with us; the takeover loop delivers it again.
            self._orphaned = True
            log.warning(
                "redis down during a callback; it will be retried", job_id=job_id, error=str(exc)
            )

    async def _attempt(self, shard: int, entry_id: str, job_id: str) -> None:
        job = await self.storage.callback_begin(job_id, entry_id, self.consumer)
        if job is None:  # ended (its entry is gone now), or another notifier's since a takeover
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
                job.id, job.outcome_event_id, job.callback_dst, callback_payload(job), job.tenant
            )
        metrics.CALLBACK_SECONDS.labels(job.callback_type).observe(time.perf_counter() - started)
        data: dict[str, Any] = {"attempt": attempt}
        delay_s = None
        if result.delivered:
            outcome, delay_ms = CallbackOutcome.DELIVERED, int(self.cfg.deletion_interval * 60_000)
        else:
            if not result.permanent:
                delay_s = callback_retry_delay_s(attempt, self.cfg.retry_schedule_seconds)
            # an error sentence may quote the callback URL, whose query may hold a token
            error = scrub(result.error, secrets_of([job.callback_dst], {}, self.security))
            result = Delivery(False, error, result.permanent)
            data["delivery_error"] = error
            if delay_s is None:
                outcome, delay_ms = CallbackOutcome.FAILED, 0
            else:
                outcome, delay_ms = CallbackOutcome.RETRY, int(delay_s * 1000)
                data["retry_in_ms"] = delay_ms
        metrics.CALLBACKS.labels(job.callback_type, outcome).inc()
        if not await self.storage.callback_end(job_id, outcome, data, entry_id, delay_ms):
            # another notifier took this entry over (ours was thought gone) and recorded a
            # later attempt: its result stands
            log.info("callback attempt overtaken by another notifier", job_id=job_id)
            return
        ids = {"job_id": job.id, "aggr_id": job.aggr_id, "attempt": attempt}
        if outcome is CallbackOutcome.DELIVERED:
            self.successful += 1
            log.info("callback delivered", **ids, callback_type=job.callback_type)
        elif outcome is CallbackOutcome.RETRY:
            self.retried += 1
            self._timer_kick.set()
            log.info("callback retry scheduled", **ids, error=result.error, retry_in_ms=delay_ms)
        else:
            self.failed += 1
            log.info("callback failed", **ids, error=result.error)
