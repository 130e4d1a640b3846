"""The processor: claims jobs within each aggregation's global cap and downloads them.

Work is found by blocking reads of the wake stream (every enqueue, finished download and due
retry announces its aggregation there), never by polling; a slow rescan of the registry is
only the safety net. Each claimed job holds a lease that a background loop renews; a lease
that runs out (the processor died) hands the job back to its queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from downloader import metrics
from downloader.backoff import download_retry_delay_s, should_retry_download
from downloader.config import Config
from downloader.errors import DownloaderError, PermanentError, TransientError
from downloader.fetch import FetchRequest, FetchResult, fetch
from downloader.filestore import open_store
from downloader.heartbeat import publish_stats
from downloader.log import get_logger
from downloader.mime import MimePattern
from downloader.netguard import NetworkPolicy
from downloader.resilience import REDIS_DOWN, forever
from downloader.s3store import S3Store, user_metadata
from downloader.storage import Finish, Storage

__all__ = ["HAND_ON_CHAIN", "Processor"]

HAND_ON_CHAIN = 8
"""How many times in a row a finishing download may hand its slot straight to the next job of
its aggregation (see Processor._hand_on)."""

log = get_logger(__name__)


@dataclass
class ProcessorStats:
    """The counters of GET /stats/processor (names as in the original service)."""

    worker_pools: int = 0
    spawned_worker_pools: int = 0
    max_worker_pools: int = 0
    workers: int = 0
    spawned_workers: int = 0
    max_workers: int = 0
    failures: int = 0
    retries: int = 0
    successes: int = 0
    paused: int = 0
    responses: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        out = {
            "workerPools": self.worker_pools,
            "spawnedWorkerPools": self.spawned_worker_pools,
            "maxWorkerPools": self.max_worker_pools,
            "workers": self.workers,
            "spawnedWorkers": self.spawned_workers,
            "maxWorkers": self.max_workers,
            "failures": self.failures,
            "retries": self.retries,
            "successes": self.successes,
            "paused": self.paused,
        }
        out.update({f"download.response.{code}": n for code, n in self.responses.items()})
        return out


class Processor:
    def __init__(self, config: Config, storage: Storage, instance: str) -> None:
        self.config = config
        self.cfg = config.processor
        self.storage = storage
        self.owner = instance
        self.store = open_store(config, self.cfg.max_workers)
        self._reap_pause_s = 0.0  # after a failed deletion (the store's bucket unreachable)
        self.s3 = S3Store(config.s3, self.cfg.max_workers) if config.s3.enabled else None
        self.policy = NetworkPolicy.from_config(config.security)
        self.stats = ProcessorStats()
        # job id -> its download (whose result is the next job it handed its slot to, if any)
        self._active: dict[str, asyncio.Task[dict[str, str] | None]] = {}
        self._not_started: dict[str, str] = {}  # job id -> lease: handed to us while stopping
        self._claiming = 0  # workers promised to the claim in flight (see _free)
        self._leases: dict[str, str] = {}  # job id -> lease token of that download's claim
        self._recording: set[str] = set()  # jobs whose outcome finish.lua is writing now
        self._per_aggr: Counter[str] = Counter()
        self._hot: dict[str, None] = {}  # aggregations that may have ready jobs, in turn order
        self._kick = asyncio.Event()
        self._timer_kick = asyncio.Event()
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then finish or hand back in-flight jobs within the grace."""
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_workers, socket_factory=self.policy.socket_factory()
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        loops = [
            asyncio.create_task(forever(name, step, lambda: self._stopping), name=name)
            for name, step in (
                ("wake", self._wake_step),
                ("dispatch", self._dispatch_step),
                ("timer", self._timer_step),
                ("reap", self._reap_step),
                ("renew", self._renew_step),
                ("disk", self._disk_step),
                ("sweep", self._sweep_step),
                (
                    "stats",
                    lambda: publish_stats(
                        self.storage,
                        "processor",
                        self.owner,
                        self.stats.as_dict,
                        self.cfg.stats_interval,
                    ),
                ),
            )
        ]
        log.info("processor started", instance=self.owner, max_workers=self.cfg.max_workers)
        try:
            await stop.wait()
        finally:
            await self._shutdown(loops)

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        self._stopping = True
        self._kick.set()
        self._timer_kick.set()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        tasks = dict(self._active)
        tokens = dict(self._leases)
        if tasks:
            log.info("finishing in-flight downloads", count=len(tasks))
            keeper = asyncio.create_task(self._keep_leases())
            try:
                _done, pending = await asyncio.wait(
                    tasks.values(), timeout=self.cfg.shutdown_grace_seconds
                )
            finally:
                keeper.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            unfinished = {jid: tokens[jid] for jid, t in tasks.items() if t in pending}
        else:
            unfinished = {}
        unfinished |= self._not_started
        if unfinished:
            try:
                n = await self.storage.release(unfinished)
                log.info("handed jobs back", count=n)
            except REDIS_DOWN:
                log.warning("could not hand jobs back; their leases will expire")
        if self._session is not None:
            await self._session.close()
        if self.s3 is not None:
            self.s3.close()
        self.store.close()
        log.info("processor stopped", instance=self.owner)

    async def _keep_leases(self) -> None:
        """Renew the leases of the downloads still finishing during the shutdown grace."""
        while self._active:
            await asyncio.sleep(self.cfg.lease_ms / 3000)
            with contextlib.suppress(*REDIS_DOWN):
                await self.storage.renew(self.cfg.lease_ms, dict(self._leases))

    # -- finding work ---------------------------------------------------------------------------

    async def _wake_step(self) -> None:
        position = await self.storage.wake_position()
        await self._rescan()
        next_rescan = time.monotonic() + self.cfg.rescan_interval_ms / 1000
        while not self._stopping:
            block_ms = max(1, min(5000, int((next_rescan - time.monotonic()) * 1000)))
            position, aggrs, aborted = await self.storage.read_wakes(position, block_ms)
            for job_id in aborted:
                if (task := self._active.get(job_id)) is not None:
                    log.info("download aborted by request", job_id=job_id)
                    task.cancel()
            if aggrs:
                self._hot.update(dict.fromkeys(aggrs))
                self._kick.set()
            if time.monotonic() >= next_rescan:
                await self._rescan()
                next_rescan = time.monotonic() + self.cfg.rescan_interval_ms / 1000

    async def _rescan(self) -> None:
        for aggr, _size in await self.storage.pending_aggregations():
            self._hot.setdefault(aggr, None)
        self._kick.set()

    def _free(self) -> int:
        """Workers neither busy nor promised to a claim in flight."""
        return self.cfg.max_workers - len(self._active) - self._claiming

    async def _dispatch_step(self) -> None:
        while not self._stopping:
            await self._kick.wait()
            self._kick.clear()
            while self._hot and self._free() > 0 and not self.stats.paused and not self._stopping:
                aggr = next(iter(self._hot))
                # a fair share of our free workers, so that one aggregation's backlog does not
                # take them all while others wait (it comes back for more at the back of the line)
                share = max(1, self._free() // len(self._hot))
                del self._hot[aggr]  # before the await: a wake arriving meanwhile re-adds it
                self._claiming = share
                try:
                    claim = await self.storage.claim(aggr, self.owner, self.cfg.lease_ms, share)
                except BaseException:
                    self._hot.setdefault(aggr, None)  # Redis down: try it again once back
                    raise
                finally:
                    self._claiming = 0
                for job in claim.jobs:
                    self._start(aggr, job, claim.proxy or None)
                if claim.ready_left > 0 and claim.free_slots > 0:
                    self._hot[aggr] = None  # more to take once we have room: back of the line

    def _start(self, aggr: str, job: dict[str, str], proxy: str | None, chain: int = 0) -> None:
        """Run one claimed job; `chain` counts the slot hand-ons that led to it."""
        job_id, token = job["id"], job["lease"]
        if (zombie := self._active.get(job_id)) is not None:
            # Our earlier claim of this job lost its lease (we stalled) and we claimed it anew:
            # the old download can no longer record anything, so stop it.
            zombie.cancel()
        if self._per_aggr[aggr] == 0:
            self.stats.spawned_worker_pools += 1
        self._per_aggr[aggr] += 1
        self.stats.worker_pools = len(+self._per_aggr)
        self.stats.max_worker_pools = max(self.stats.max_worker_pools, self.stats.worker_pools)
        self.stats.spawned_workers += 1
        task = asyncio.create_task(self._work(job, proxy, chain), name=f"job:{job_id}")
        self._active[job_id] = task
        self._leases[job_id] = token
        self.stats.workers = len(self._active)
        self.stats.max_workers = max(self.stats.max_workers, self.stats.workers)
        metrics.WORKERS.set(len(self._active))

        def done(_t: asyncio.Task[dict[str, str] | None]) -> None:
            if self._active.get(job_id) is task:
                del self._active[job_id]
                del self._leases[job_id]
            self._per_aggr[aggr] -= 1
            self.stats.worker_pools = len(+self._per_aggr)
            self.stats.workers = len(self._active)
            metrics.WORKERS.set(len(self._active))
            if not _t.cancelled():
                if (exc := _t.exception()) is not None:
                    log.error("download task failed", job_id=job_id, exc_info=exc)
                elif (next_job := _t.result()) is None:
                    pass
                elif self._stopping:  # claimed for us as we stopped: hand it back in _shutdown
                    self._not_started[next_job["id"]] = next_job["lease"]
                else:
                    self._start(aggr, next_job, proxy, chain + 1)  # handed on by finish.lua
            self._kick.set()

        task.add_done_callback(done)

    # -- one job --------------------------------------------------------------------------------

    def _request(self, job: dict[str, str], proxy: str | None) -> FetchRequest:
        headers = self.cfg.request_headers
        raw = job.get("request_headers")
        if raw and raw != "{}":  # override the defaults name by name, any case
            overrides: dict[str, str] = json.loads(raw)
            named = {k.lower() for k in overrides}
            headers = {k: v for k, v in headers.items() if k.lower() not in named} | overrides
        timeout_s = int(job.get("download_timeout") or 0) or self.cfg.download_timeout_seconds
        pattern = job.get("mime_type") or ""
        return FetchRequest(
            url=job["url"],
            headers=dict(headers),
            proxy=proxy,
            timeout_s=float(timeout_s),
            connect_timeout_s=min(self.cfg.connect_timeout_seconds, float(timeout_s)),
            max_bytes=self.cfg.max_download_bytes,
            mime=MimePattern.parse(pattern) if pattern else None,
            extract_image_size=job.get("extract_image_size") == "true",
        )

    async def _work(
        self, job: dict[str, str], proxy: str | None, chain: int = 0
    ) -> dict[str, str] | None:
        """Download one job and record its outcome; returns the aggregation's next job when
        finish.lua handed this slot on to it (started by the task's done callback, once this
        one's worker is accounted free)."""
        job_id, lease = job["id"], job["lease"]
        attempt = int(job["download_attempts"])
        tmp = self.store.tmp_path(job_id, lease.replace("/", "."))
        started = time.perf_counter()
        outcome: str
        data: dict[str, Any]
        retry_in_ms = 0
        assert self._session is not None
        try:
            if job.get("s3_bucket") and self.s3 is None:  # no point downloading it
                raise PermanentError("S3 storage is not enabled on this processor (s3.enabled)")
            result = await fetch(self._session, self._request(job, proxy), tmp)
            location = await self._store(job, tmp, result)
            outcome, data = (
                "succeeded",
                {
                    "attempt": attempt,
                    "response_code": result.response_code,
                    **location,
                    "file_mime_type": result.mime_type,
                    "file_bytes": result.size,
                    "image_size": result.image_size,
                },
            )
            self.stats.responses[result.response_code] += 1
            metrics.DOWNLOAD_BYTES.inc(result.size)
        except (TransientError, PermanentError) as exc:  # fetch and _store left no temp file
            self.stats.responses[exc.response_code] += 1
            retriable = isinstance(exc, TransientError)
            data = {"attempt": attempt, "response_code": exc.response_code, "error": str(exc)}
            if should_retry_download(attempt, int(job["max_retries"]), retriable):
                retry_in_ms = int(
                    1000
                    * download_retry_delay_s(
                        attempt, self.cfg.retry_backoff_seconds, self.cfg.retry_backoff_cap_seconds
                    )
                )
                outcome, data = "retry", {**data, "retry_in_ms": retry_in_ms}
            else:
                outcome = "failed"
        except Exception as exc:  # a bug must not wedge the job: fail it, visibly
            self.store.discard(tmp)
            log.exception("download crashed", job_id=job_id)
            outcome, data = (
                "failed",
                {
                    "attempt": attempt,
                    "response_code": 0,
                    "error": f"Internal error: {type(exc).__name__}",
                },
            )
        metrics.DOWNLOAD_SECONDS.observe(time.perf_counter() - started)
        metrics.DOWNLOADS.labels(outcome).inc()
        self._recording.add(job_id)
        try:
            finish = await self._record(
                job_id, lease, outcome, data, retry_in_ms, self._hand_on(chain)
            )
        finally:
            self._recording.discard(job_id)
        recorded = finish.recorded
        if not recorded and outcome == "succeeded":
            await self._drop_orphan(job_id)
        if recorded:
            if outcome == "failed":
                self.stats.failures += 1
            elif outcome == "retry":
                self.stats.retries += 1
                self._timer_kick.set()
            else:
                self.stats.successes += 1
        return finish.next_job

    def _hand_on(self, chain: int) -> bool:
        """Should the slot this download frees go straight to its aggregation's next job?
        Yes unless we are stopping or paused; or the slot has been handed on HAND_ON_CHAIN
        times in a row (it then goes back through the wake, so that the slots of a busy
        aggregation keep spreading over all processors instead of staying with the first one
        that claimed them); or other aggregations wait for a worker of ours and we have none
        free (the slot then goes back to the round robin)."""
        if self._stopping or self.stats.paused or chain >= HAND_ON_CHAIN:
            return False
        return not self._hot or self._free() > 0

    async def _store(self, job: dict[str, str], tmp: Path, result: FetchResult) -> dict[str, str]:
        """Put a verified download where the job wants it: the job's S3 bucket, or the file
        store. Returns the event data saying where; S3 errors keep the download's status."""
        job_id, bucket = job["id"], job.get("s3_bucket", "")
        if not bucket:
            try:
                return {"download_url": await self.store.commit(tmp, job_id, result.mime_type)}
            except (TransientError, PermanentError) as exc:
                raise type(exc)(str(exc), result.response_code) from exc
        assert self.s3 is not None  # checked before the download
        key = self.s3.key(job_id)
        try:
            metadata = user_metadata(job.get("extra", ""))
        except ValueError as exc:  # checked at POST since; a job accepted before may hold it
            log.warning("extra left out of the S3 metadata", job_id=job_id, reason=str(exc))
            metadata = {}
        started = time.perf_counter()
        try:
            await self.s3.upload(
                tmp, bucket, job.get("s3_region", ""), key, result.mime_type, metadata
            )
        except (TransientError, PermanentError) as exc:
            raise type(exc)(str(exc), result.response_code) from exc
        finally:  # uploaded, failed or cancelled: the temp file has served
            metrics.S3_UPLOAD_SECONDS.observe(time.perf_counter() - started)
            self.store.discard(tmp)
        return {"download_url": self.s3.url(bucket, key), "s3_bucket": bucket, "s3_key": key}

    async def _drop_orphan(self, job_id: str) -> None:
        """We stored a file but lost the lease. If the job ended without success (aborted,
        failed elsewhere) nothing will ever reap that file: remove it. If it is still running
        or succeeded elsewhere, the file at that path is (or will be) that download's."""
        with contextlib.suppress(*REDIS_DOWN, DownloaderError):
            job = await self.storage.get_job(job_id)
            if job is not None and job.get("download_state") == "Failed":
                await asyncio.to_thread(self.store.delete, job_id)
                log.info("removed the file of a job that ended without us", job_id=job_id)

    async def _record(
        self,
        job_id: str,
        lease: str,
        outcome: str,
        data: dict[str, Any],
        retry_in_ms: int,
        hand_on: bool,
    ) -> Finish:
        """Write the outcome, riding out a short Redis outage while the lease lasts."""
        deadline = time.monotonic() + self.cfg.lease_ms / 1000
        delay = 0.05
        while True:
            try:
                finish = await self.storage.finish(
                    job_id,
                    lease,
                    outcome,
                    data,
                    retry_in_ms,
                    next_owner=self.owner if hand_on else "",
                    lease_ms=self.cfg.lease_ms,
                )
                if not finish.recorded:
                    log.warning("lease lost before the outcome was written", job_id=job_id)
                return finish
            except REDIS_DOWN:
                if time.monotonic() > deadline:
                    log.warning(
                        "redis down past the lease; the job will be requeued", job_id=job_id
                    )
                    return Finish(False, None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- background -----------------------------------------------------------------------------

    async def _timer_step(self) -> None:
        """Promote due retries, requeue expired leases; sleep until the next is due."""
        _moved, next_retry_ms = await self.storage.promote_retries()
        while await self.storage.requeue_expired() > 0:
            pass
        waits = [self.cfg.lease_ms / 2] + [ms for ms in (next_retry_ms,) if ms >= 0]
        self._timer_kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._timer_kick.wait(), max(1, min(waits)) / 1000)

    async def _reap_step(self) -> None:
        """Delete the files whose callback was delivered `deletion_interval` ago; sleep until the
        next is due. Its own loop: a file store that is slow to answer (an S3 bucket) holds up
        no retry nor requeue. A failed deletion is retried after 1 s, doubling to 60 s."""
        due, next_reap_ms = await self.storage.reap_due()
        for job_id in due:
            try:
                await asyncio.to_thread(self.store.delete, job_id)
            except DownloaderError as exc:
                self._reap_pause_s = min(max(1.0, self._reap_pause_s * 2), 60.0)
                log.warning("could not delete a stored file; will retry", job_id=job_id,
                            error=str(exc), retry_in_s=self._reap_pause_s)  # fmt: skip
                await asyncio.sleep(self._reap_pause_s)
                return
            self._reap_pause_s = 0.0
            await self.storage.reap_done(job_id)
        wait_ms = min(self.cfg.lease_ms / 2, next_reap_ms if next_reap_ms >= 0 else math.inf)
        await asyncio.sleep(max(1, wait_ms) / 1000)

    async def _renew_step(self) -> None:
        await asyncio.sleep(self.cfg.lease_ms / 3000)
        lost = await self.storage.renew(self.cfg.lease_ms, dict(self._leases))
        for job_id in lost:
            task = self._active.get(job_id)
            # a job being recorded may have released its own lease just now; finish is fenced
            if task is not None and job_id not in self._recording:
                log.warning("lease lost, abandoning download", job_id=job_id)
                task.cancel()

    async def _sweep_step(self) -> None:
        """Hourly: drop temp files of dead processors (older than any download may last)."""
        stale_s = self.cfg.download_timeout_seconds + 2 * self.cfg.lease_ms / 1000
        if removed := await asyncio.to_thread(self.store.sweep_tmp, stale_s):
            log.info("removed stale temporary files", count=removed)
        await asyncio.sleep(3600)

    async def _disk_step(self) -> None:
        used = await asyncio.to_thread(self.store.used_percent)
        if not self.stats.paused and used >= self.cfg.disk_pause_percent:
            self.stats.paused = 1
            log.warning("disk full: not taking jobs", used_percent=round(used, 1))
        elif self.stats.paused and used < self.cfg.disk_resume_percent:
            self.stats.paused = 0
            log.info("disk has room again: taking jobs", used_percent=round(used, 1))
            await self._rescan()
        metrics.PAUSED.set(self.stats.paused)
        await asyncio.sleep(self.cfg.disk_check_interval_ms / 1000)
