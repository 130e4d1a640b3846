"""The processor's timers: due download retries go back to their queues, expired leases (a dead
processor's jobs) are requeued, delivered files are reaped, stale temp files swept, and the disk
watched. Each sleeps until its next item is due rather than polling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from downloader import metrics
from downloader.config import ProcessorConfig
from downloader.filestore import FileStore
from downloader.log import get_logger
from downloader.storage import Storage

__all__ = ["Upkeep"]

log = get_logger(__name__)

Step = Callable[[], Awaitable[None]]

REAP_RETRY_MS = 600_000
"""A file the reaper could not delete (a disk error) is tried again this much later."""


class Upkeep:
    def __init__(
        self,
        cfg: ProcessorConfig,
        storage: Storage,
        store: FileStore,
        on_resume: Callable[[], Awaitable[None]],
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.store = store
        self.paused = False
        """True while the disk is too full to take jobs."""
        self._on_resume = on_resume
        self._kick = asyncio.Event()

    def steps(self) -> list[tuple[str, Step]]:
        """The loops to run (each under `resilience.forever`)."""
        return [("timer", self._timer_step), ("disk", self._disk_step), ("sweep", self._sweep)]

    def kick(self) -> None:
        """Something became due earlier than the timer thought (a retry was just scheduled)."""
        self._kick.set()

    async def _timer_step(self) -> None:
        """Promote due retries, requeue expired leases, reap delivered files; sleep until due."""
        _moved, next_retry_ms = await self.storage.promote_retries()
        while await self.storage.requeue_expired() > 0:
            pass
        due, next_reap_ms = await self.storage.reap_due()
        for job_id in due:
            try:
                await asyncio.to_thread(self.store.delete, job_id)
            except OSError as exc:  # a disk error, not an outage: say which file, try later
                log.error(
                    "could not delete a delivered file; trying again later",
                    job_id=job_id,
                    error=str(exc),
                    retry_in_s=REAP_RETRY_MS // 1000,
                )
                await self.storage.reap_later(job_id, REAP_RETRY_MS)
                continue
            await self.storage.reap_done(job_id)
        waits = [self.cfg.lease_ms / 2] + [ms for ms in (next_retry_ms, next_reap_ms) if ms >= 0]
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), max(1, min(waits)) / 1000)

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
