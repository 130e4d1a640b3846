"""The processor's timers: due download retries go back to their queues, expired leases (a dead
processor's jobs) are requeued, delivered files are reaped, stale temp files swept, and the disk
watched. Each sleeps until its next item is due rather than polling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from downloader import metrics
from downloader.config import ProcessorConfig
from downloader.errors import DownloaderError
from downloader.filestore import Store
from downloader.log import get_logger
from downloader.storage import Storage

__all__ = ["Upkeep"]

log = get_logger(__name__)

Step = Callable[[], Awaitable[None]]

REAP_RETRY_MS = 60_000
"""A file the reaper could not delete (a disk error, a bucket that refused) is tried again
this much later; the others are deleted meanwhile."""


class Upkeep:
    def __init__(
        self,
        cfg: ProcessorConfig,
        storage: Storage,
        store: Store,
        on_resume: Callable[[], Awaitable[None]],
        stream_window_ms: int = 3_600_000,
    ) -> None:
        self.cfg = cfg
        self.stream_window_ms = stream_window_ms
        self.storage = storage
        self.store = store
        self.paused = False
        """True while the disk is too full to take jobs."""
        self._on_resume = on_resume
        self._kick = asyncio.Event()

    def steps(self) -> list[tuple[str, Step]]:
        """The loops to run (each under `resilience.forever`)."""
        return [
            ("timer", self._timer_step),
            ("reap", self._reap_step),
            ("trim", self._trim_step),
            ("disk", self._disk_step),
            ("sweep", self._sweep),
        ]

    def kick(self) -> None:
        """Something became due earlier than the timer thought (a retry was just scheduled)."""
        self._kick.set()

    async def _timer_step(self) -> None:
        """Promote due retries, requeue expired leases, in every shard (the calls of one round
        share a pipeline); sleep until the next is due."""
        shards = self.storage.all_shards
        promoted = await asyncio.gather(*(self.storage.promote_retries(s) for s in shards))
        busy = list(shards)
        while busy:  # until no shard has expired leases left
            counts = await asyncio.gather(*(self.storage.requeue_expired(s) for s in busy))
            busy = [s for s, n in zip(busy, counts, strict=True) if n > 0]
        waits = [self.cfg.lease_ms / 2] + [ms for _n, ms in promoted if ms >= 0]
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), max(1, min(waits)) / 1000)

    async def _reap_step(self) -> None:
        """Delete the files whose callback was delivered `deletion_interval` ago; sleep until the
        next is due. A loop of its own: a store slow to answer (an S3 bucket) holds up neither
        retries nor requeues."""
        rounds = await asyncio.gather(*(self.storage.reap_due(s) for s in self.storage.all_shards))
        due = [job_id for ids, _ms in rounds for job_id in ids]
        pending = [ms for _ids, ms in rounds if ms >= 0]
        next_reap_ms = min(pending) if pending else -1
        for job_id in due:
            try:
                await asyncio.to_thread(self.store.delete, job_id)
            except (OSError, DownloaderError) as exc:  # not an outage of ours: say which, go on
                log.error(
                    "could not delete a stored file; trying again later",
                    job_id=job_id,
                    error=str(exc),
                    retry_in_s=REAP_RETRY_MS // 1000,
                )
                await self.storage.reap_later(job_id, REAP_RETRY_MS)
                continue
            await self.storage.reap_done(job_id)
        wait_ms = (
            self.cfg.lease_ms / 2 if next_reap_ms < 0 else min(self.cfg.lease_ms / 2, next_reap_ms)
        )
        await asyncio.sleep(max(1, wait_ms) / 1000)

    async def _trim_step(self) -> None:
        """Every few seconds: each shard's event stream back to its window (events.
        stream_window_minutes) and its job index to the jobs that can still exist."""
        now_ms = int(time.time() * 1000)
        trims = await asyncio.gather(
            *(self.storage.trim(s, self.stream_window_ms, now_ms) for s in self.storage.all_shards)
        )
        shards = self.storage.all_shards
        for shard, (_trimmed, _removed, unexported) in zip(shards, trims, strict=True):
            if unexported:
                log.warning(
                    "event export fell behind the stream's window; events were lost to it",
                    shard=shard,
                    window_minutes=self.stream_window_ms / 60_000,
                )
        await asyncio.sleep(min(10.0, self.stream_window_ms / 10_000))

    async def _sweep(self) -> None:
        """Hourly: drop temp files of dead processors (older than any download may last)."""
        stale_s = self.cfg.download_timeout_seconds + 2 * self.cfg.lease_ms / 1000
        if removed := await asyncio.to_thread(self.store.sweep_tmp, stale_s):
            log.info("removed stale temporary files", count=removed)
        await asyncio.sleep(3600)

    async def _disk_step(self) -> None:
        """Stop taking jobs when the disk is `disk_pause_percent` full, resume below
        `disk_resume_percent`."""
        used = await asyncio.to_thread(self.store.used_percent)
        if not self.paused and used >= self.cfg.disk_pause_percent:
            self.paused = True
            log.warning("disk full: not taking jobs", used_percent=round(used, 1))
        elif self.paused and used < self.cfg.disk_resume_percent:
            self.paused = False
            log.info("disk has room again: taking jobs", used_percent=round(used, 1))
            await self._on_resume()
        metrics.PAUSED.set(int(self.paused))
        await asyncio.sleep(self.cfg.disk_check_interval_ms / 1000)
