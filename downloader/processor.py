"""The processor: claims jobs within each aggregation's global cap, downloads them, records
each outcome.

A job's way through here reads top to bottom: `_dispatch_step` claims jobs of an aggregation
that has work (found by blocking reads of the wake stream: every enqueue, finished download and
due retry announces its aggregation there; a slow rescan of the registry is only the safety
net), `_worker` runs a claimed job: `_download` (fetch, verify, store) then `_record` (the
outcome, fenced by the claim's lease). Recording can hand the freed slot straight to the
aggregation's next job, which the same worker then runs. Each claimed job holds a lease that
`_renew_step` extends; a lease that runs out (the processor died) hands the job back to its
queue (see upkeep.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from downloader import metrics
from downloader.backoff import download_retry_delay_s, should_retry_download
from downloader.config import Config, S3Storage
from downloader.errors import (
    DownloaderError,
    PermanentError,
    StorageUnavailable,
    TransientError,
)
from downloader.fetch import Egress, FetchRequest, FetchResult, fetch
from downloader.filestore import open_store
from downloader.heartbeat import publish_stats
from downloader.jobs import ClaimedJob
from downloader.log import get_logger
from downloader.mime import MimePattern
from downloader.redact import scrub, secrets_of
from downloader.resilience import forever
from downloader.s3store import S3Store, user_metadata
from downloader.storage import Finish, Storage
from downloader.upkeep import Upkeep
from downloader.vocabulary import DownloadOutcome, DownloadState

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


@dataclass(frozen=True)
class Attempt:
    """How one download attempt went, as finish.lua records it."""

    outcome: DownloadOutcome
    data: dict[str, Any]
    retry_in_ms: int = 0


class Processor:
    def __init__(self, config: Config, storage: Storage, instance: str) -> None:
        self.config = config
        self.cfg = config.processor
        self.storage = storage
        self.owner = instance
        # one S3Store (clients, upload threads) for the file store and the jobs' own buckets
        uploads = None
        if config.s3.enabled or isinstance(self.cfg.filestorage, S3Storage):
            uploads = S3Store(config.s3, self.cfg.max_workers)
        self.store = open_store(config, uploads)
        self.s3 = uploads if config.s3.enabled else None  # jobs may name a bucket
        self.egress = Egress.from_config(config)
        self.stats = ProcessorStats()
        self.upkeep = Upkeep(
            self.cfg,
            storage,
            self.store,
            on_resume=self._rescan,
            stream_window_ms=int(config.events.stream_window_minutes * 60_000),
        )
        # job id -> the worker running it (a worker runs one job, then those handed on to it)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._not_started: dict[str, str] = {}  # job id -> lease: handed to us while stopping
        self._claiming = 0  # workers promised to the claim in flight (see _free)
        self._leases: dict[str, str] = {}  # job id -> lease token of that download's claim
        self._recording: set[str] = set()  # jobs whose outcome finish.lua is writing now
        self._per_aggr: Counter[str] = Counter()
        # aggregations that may have ready jobs (id -> shard), in turn order
        self._hot: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then finish or hand back in-flight jobs within the grace."""
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_workers, socket_factory=self.egress.policy.socket_factory()
        )
        # no cookie jar: a cookie one job's origin sets must not reach another job
        self._session = aiohttp.ClientSession(
            connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (f"wake-{group[0]}", functools.partial(self._wake_step, group))
            for group in self.storage.shard_groups()
        ]
        steps += [
            ("rescan", self._rescan_step),
            ("dispatch", self._dispatch_step),
            ("renew", self._renew_step),
            ("stats", self._stats_step),
            *self.upkeep.steps(),
        ]
        loops = [
            asyncio.create_task(forever(name, step, lambda: self._stopping), name=name)
            for name, step in steps
        ]
        log.info("processor started", instance=self.owner, max_workers=self.cfg.max_workers)
        try:
            await stop.wait()
        finally:
            await self._shutdown(loops)

    async def _stats_step(self) -> None:
        self.stats.paused = int(self.upkeep.paused)
        await publish_stats(
            self.storage, "processor", self.owner, self.stats.as_dict, self.cfg.stats_interval
        )

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        self._stopping = True
        self._kick.set()
        self.upkeep.kick()
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
            except StorageUnavailable:
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
            with contextlib.suppress(StorageUnavailable):
                await self.storage.renew(self.cfg.lease_ms, dict(self._leases))

    # -- finding work ---------------------------------------------------------------------------

    async def _wake_step(self, shards: list[int]) -> None:
        """Block on the wake streams of `shards` (one of storage.shard_groups()): an
        aggregation announced there may have work, a job named there was aborted."""
        positions = await self.storage.wake_positions(shards)
        await self._rescan()  # what was announced before we stood at the tail (a restart)
        while not self._stopping:
            positions, wakes = await self.storage.read_wakes(positions, 5000)
            for job_id in wakes.aborted:
                if (task := self._active.get(job_id)) is not None:
                    log.info("download aborted by request", job_id=job_id)
                    task.cancel()
            if wakes.aggregations:
                self._hot.update(wakes.aggregations)
                self._kick.set()

    async def _rescan_step(self) -> None:
        """The safety net under the wakes: every rescan_interval_ms, the registries."""
        await self._rescan()
        await asyncio.sleep(self.cfg.rescan_interval_ms / 1000)

    async def _rescan(self) -> None:
        for aggr, _size, shard in await self.storage.pending_aggregations():
            self._hot.setdefault(aggr, shard)
        self._kick.set()

    def _free(self) -> int:
        """Workers neither busy nor promised to a claim in flight."""
        return self.cfg.max_workers - len(self._active) - self._claiming

    async def _dispatch_step(self) -> None:
        while not self._stopping:
            await self._kick.wait()
            self._kick.clear()
            while self._free() > 0 and not self.upkeep.paused and not self._stopping:
                aggr, waiting = self._next_waiting()
                if aggr is None:
                    break  # what is hot holds its cap: a worker finishing kicks us again
                # a fair share of our free workers, so that one aggregation's backlog does not
                # take them all while others wait (it comes back for more at the back of the
                # line), and never more than its cap, so that slow downloads of one aggregation
                # leave workers for those that come later
                share = min(max(1, self._free() // waiting), self._room(aggr))
                shard = self._hot.pop(aggr)  # before the await: a wake meanwhile re-adds it
                self._claiming = share
                try:
                    claim = await self.storage.claim(
                        shard, aggr, self.owner, self.cfg.lease_ms, share
                    )
                except BaseException:
                    self._hot.setdefault(aggr, shard)  # Redis down: try it again once back
                    raise
                finally:
                    self._claiming = 0
                for job in claim.jobs:
                    self._start(aggr, job, claim.proxy or None)
                if claim.ready_left > 0 and claim.free_slots > 0:
                    self._hot[aggr] = shard  # more to take once we have room: back of the line

    def _room(self, aggr: str) -> int:
        """Workers of ours `aggr` may still take (processor.max_workers_per_aggregation)."""
        return self.cfg.aggregation_workers - self._per_aggr[aggr]

    def _capped(self) -> set[str]:
        """The aggregations holding all the workers their cap allows (at most max_workers)."""
        cap = self.cfg.aggregation_workers
        return {aggr for aggr, n in self._per_aggr.items() if n >= cap}

    def _next_waiting(self) -> tuple[str | None, int]:
        """The first hot aggregation in turn order that may take a worker, and how many may."""
        capped = self._capped()
        first = next((aggr for aggr in self._hot if aggr not in capped), None)
        return first, len(self._hot) - len(capped & self._hot.keys())

    def _start(self, aggr: str, job: ClaimedJob, proxy: str | None) -> None:
        """Run one claimed job (and whatever is handed on to it) on a worker of its own."""
        task = asyncio.create_task(self._worker(aggr, job, proxy), name=f"job:{job.id}")
        self._take(aggr, job, task)
        self._count_workers()

        def done(_t: asyncio.Task[None]) -> None:
            # a worker cancelled before it ran never reached its own clean-up
            self._drop(aggr, job, task)
            self._count_workers()
            if not _t.cancelled() and (exc := _t.exception()) is not None:
                log.error("worker failed", aggr_id=aggr, exc_info=exc)
            self._kick.set()

        task.add_done_callback(done)

    def _take(self, aggr: str, job: ClaimedJob, task: asyncio.Task[None]) -> None:
        """Book `job` on the worker `task`: its lease is renewed from now on."""
        if (zombie := self._active.get(job.id)) is not None:
            # Our earlier claim of this job lost its lease (we stalled) and we claimed it anew:
            # the old download can no longer record anything, so stop it.
            zombie.cancel()
            self._per_aggr[aggr] -= 1
        if self._per_aggr[aggr] == 0:
            self.stats.spawned_worker_pools += 1
        self._per_aggr[aggr] += 1
        self._active[job.id] = task
        self._leases[job.id] = job.lease
        self.stats.spawned_workers += 1

    def _drop(self, aggr: str, job: ClaimedJob, task: asyncio.Task[None]) -> None:
        """The worker `task` is done with `job` (recorded, abandoned or cancelled)."""
        if self._active.get(job.id) is task:
            del self._active[job.id]
            del self._leases[job.id]
            self._per_aggr[aggr] -= 1
            if self._per_aggr[aggr] <= 0:  # only aggregations at work stay counted
                del self._per_aggr[aggr]

    def _count_workers(self) -> None:
        self.stats.workers = len(self._active)
        self.stats.max_workers = max(self.stats.max_workers, self.stats.workers)
        self.stats.worker_pools = len(+self._per_aggr)
        self.stats.max_worker_pools = max(self.stats.max_worker_pools, self.stats.worker_pools)
        metrics.WORKERS.set(len(self._active))

    # -- one worker: download, record, and on to the next job of the slot ----------------------

    async def _worker(self, aggr: str, job: ClaimedJob, proxy: str | None) -> None:
        """Download `job` and record its outcome; while recording hands the slot on to the
        aggregation's next job (at most HAND_ON_CHAIN times in a row), run that one too."""
        task = asyncio.current_task()
        assert task is not None
        chain = 0
        try:
            while True:
                attempt = await self._download(job, proxy)
                handed_on = await self._record(job, attempt, hand_on=self._hand_on(aggr, chain))
                if handed_on is None:
                    return
                if self._stopping:  # claimed for us as we stopped: handed back in _shutdown
                    self._not_started[handed_on.id] = handed_on.lease
                    return
                self._take(aggr, handed_on, task)
                self._drop(aggr, job, task)
                self._count_workers()
                job, chain = handed_on, chain + 1
        finally:
            self._drop(aggr, job, task)
            self._count_workers()

    def _request(self, job: ClaimedJob, proxy: str | None) -> FetchRequest:
        headers = self.cfg.request_headers
        if job.request_headers:  # override the defaults name by name, any case
            named = {k.lower() for k in job.request_headers}
            headers = {k: v for k, v in headers.items() if k.lower() not in named}
            headers |= job.request_headers
        timeout_s = job.download_timeout or self.cfg.download_timeout_seconds
        return FetchRequest(
            url=job.url,
            headers=dict(headers),
            proxy=proxy,
            timeout_s=float(timeout_s),
            connect_timeout_s=min(self.cfg.connect_timeout_seconds, float(timeout_s)),
            max_bytes=self.cfg.max_download_bytes,
            mime=MimePattern.parse(job.mime_type) if job.mime_type else None,
            extract_image_size=job.extract_image_size,
        )

    async def _download(self, job: ClaimedJob, proxy: str | None) -> Attempt:
        """Fetch, verify and store one job; never raises but for cancellation. A failure is
        an Attempt that fails or schedules a retry, and leaves no file behind."""
        tmp = self.store.tmp_path(job.id, job.lease.replace("/", "."))
        started = time.perf_counter()
        base = {"attempt": job.attempt}
        try:
            if job.s3_bucket and self.s3 is None:  # no point downloading it
                raise PermanentError("S3 storage is not enabled on this processor (s3.enabled)")
            result = await fetch(
                self._session_or_fail(), self._request(job, proxy), tmp, self.egress
            )
            location = await self._store(job, tmp, result)
            self.stats.responses[result.response_code] += 1
            metrics.DOWNLOAD_BYTES.inc(result.size)
            attempt = Attempt(
                DownloadOutcome.SUCCEEDED,
                {
                    **base,
                    "response_code": result.response_code,
                    **location,
                    "file_mime_type": result.mime_type,
                    "file_bytes": result.size,
                    "image_size": result.image_size,
                },
            )
        except (TransientError, PermanentError) as exc:  # fetch and _store left no temp file
            self.stats.responses[exc.response_code] += 1
            error = scrub(str(exc), self._secrets(job, proxy))  # errors may quote a URL
            data = {**base, "response_code": exc.response_code, "error": error}
            retriable = isinstance(exc, TransientError)
            if should_retry_download(job.attempt, job.max_retries, retriable):
                retry_in_ms = int(
                    1000
                    * download_retry_delay_s(
                        job.attempt,
                        self.cfg.retry_backoff_seconds,
                        self.cfg.retry_backoff_cap_seconds,
                    )
                )
                data["retry_in_ms"] = retry_in_ms
                attempt = Attempt(DownloadOutcome.RETRY, data, retry_in_ms)
            else:
                attempt = Attempt(DownloadOutcome.FAILED, data)
        except Exception as exc:  # a bug must not wedge the job: fail it, visibly
            self.store.discard(tmp)
            log.exception("download crashed", job_id=job.id, aggr_id=job.aggr_id)
            error = f"Internal error: {type(exc).__name__}"
            attempt = Attempt(DownloadOutcome.FAILED, {**base, "response_code": 0, "error": error})
        metrics.DOWNLOAD_SECONDS.observe(time.perf_counter() - started)
        metrics.DOWNLOADS.labels(attempt.outcome).inc()
        return attempt

    def _secrets(self, job: ClaimedJob, proxy: str | None) -> list[str]:
        """What of this job must never show in an error sentence (see redact.py)."""
        return secrets_of([job.url, proxy or ""], job.request_headers, self.config.security)

    def _session_or_fail(self) -> aiohttp.ClientSession:
        assert self._session is not None, "run() opens the session"
        return self._session

    async def _store(self, job: ClaimedJob, tmp: Path, result: FetchResult) -> dict[str, str]:
        """Put a verified download where the job wants it: the job's S3 bucket, or the file
        store. Returns the event data saying where; storage errors keep the download's status."""
        if not job.s3_bucket:
            try:
                return {"download_url": await self.store.commit(tmp, job.id, result.mime_type)}
            except (TransientError, PermanentError) as exc:
                raise type(exc)(str(exc), result.response_code) from exc
        assert self.s3 is not None  # checked before the download
        key = self.s3.key(job.id)
        try:
            metadata = user_metadata(job.extra)
        except ValueError as exc:  # checked at POST since; a job accepted before may hold it
            log.warning("extra left out of the S3 metadata", job_id=job.id, reason=str(exc))
            metadata = {}
        started = time.perf_counter()
        try:
            await self.s3.upload(tmp, job.s3_bucket, job.s3_region, key, result.mime_type, metadata)
        except (TransientError, PermanentError) as exc:
            raise type(exc)(str(exc), result.response_code) from exc
        finally:  # uploaded, failed or cancelled: the temp file has served
            metrics.S3_UPLOAD_SECONDS.observe(time.perf_counter() - started)
            self.store.discard(tmp)
        return {
            "download_url": self.s3.url(job.s3_bucket, key),
            "s3_bucket": job.s3_bucket,
            "s3_key": key,
        }

    def _hand_on(self, aggr: str, chain: int) -> bool:
        """Should the slot this download of `aggr` frees go straight to its next job?
        Yes unless we are stopping or paused; or the slot has been handed on HAND_ON_CHAIN
        times in a row (it then goes back through the wake, so that the slots of a busy
        aggregation keep spreading over all processors instead of staying with the first one
        that claimed them); or `aggr` holds more workers than its cap; or other aggregations
        wait for a worker of ours and we have none free (the slot then goes back to the round
        robin)."""
        if self._stopping or self.upkeep.paused or chain >= HAND_ON_CHAIN:
            return False
        if self._room(aggr) < 0:
            return False
        capped = self._capped()
        others_wait = any(a != aggr and a not in capped for a in self._hot)
        return not others_wait or self._free() > 0

    async def _record(self, job: ClaimedJob, attempt: Attempt, hand_on: bool) -> ClaimedJob | None:
        """Write the outcome under the claim's lease and log it; returns the next job of the
        aggregation when the freed slot was handed on to it."""
        self._recording.add(job.id)
        try:
            finish = await self._finish(job, attempt, hand_on)
        finally:
            self._recording.discard(job.id)
        if not finish.recorded:
            log.warning("lease lost before the outcome was written", job_id=job.id)
            if attempt.outcome is DownloadOutcome.SUCCEEDED:
                await self._drop_orphan(job.id)
            return None
        self._log_outcome(job, attempt)
        if attempt.outcome is DownloadOutcome.FAILED:
            self.stats.failures += 1
        elif attempt.outcome is DownloadOutcome.RETRY:
            self.stats.retries += 1
            self.upkeep.kick()
        else:
            self.stats.successes += 1
        return finish.next_job

    @staticmethod
    def _log_outcome(job: ClaimedJob, attempt: Attempt) -> None:
        d = attempt.data
        ids = {"job_id": job.id, "aggr_id": job.aggr_id, "attempt": job.attempt}
        if attempt.outcome is DownloadOutcome.SUCCEEDED:
            log.info(
                "download succeeded",
                **ids,
                response_code=d["response_code"],
                bytes=d["file_bytes"],
                mime_type=d["file_mime_type"],
            )
        elif attempt.outcome is DownloadOutcome.RETRY:
            log.info(
                "download retry scheduled",
                **ids,
                response_code=d["response_code"],
                error=d["error"],
                retry_in_ms=attempt.retry_in_ms,
            )
        else:
            log.info("download failed", **ids, response_code=d["response_code"], error=d["error"])

    async def _finish(self, job: ClaimedJob, attempt: Attempt, hand_on: bool) -> Finish:
        """finish.lua, riding out a short Redis outage while the lease lasts."""
        deadline = time.monotonic() + self.cfg.lease_ms / 1000
        delay = 0.05
        while True:
            try:
                return await self.storage.finish(
                    job.id,
                    job.lease,
                    attempt.outcome,
                    attempt.data,
                    attempt.retry_in_ms,
                    next_owner=self.owner if hand_on else "",
                    lease_ms=self.cfg.lease_ms,
                )
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    log.warning(
                        "redis down past the lease; the job will be requeued", job_id=job.id
                    )
                    return Finish(False, None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _drop_orphan(self, job_id: str) -> None:
        """We stored a file but lost the lease. If the job ended without success (aborted,
        failed elsewhere) nothing will ever reap that file: remove it. If it is still running
        or succeeded elsewhere, the file at that path is (or will be) that download's."""
        with contextlib.suppress(DownloaderError):  # Redis down, job gone, the store failing
            job = await self.storage.get_job(job_id)
            if job.download_state is DownloadState.FAILED:
                await asyncio.to_thread(self.store.delete, job_id)
                log.info("removed the file of a job that ended without us", job_id=job_id)

    # -- leases ---------------------------------------------------------------------------------

    async def _renew_step(self) -> None:
        await asyncio.sleep(self.cfg.lease_ms / 3000)
        lost = await self.storage.renew(self.cfg.lease_ms, dict(self._leases))
        for job_id in lost:
            task = self._active.get(job_id)
            # a job being recorded may have released its own lease just now; finish is fenced
            if task is not None and job_id not in self._recording:
                log.warning("lease lost, abandoning download", job_id=job_id)
                task.cancel()
