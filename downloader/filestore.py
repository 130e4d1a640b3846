"""The file store of the downloads that name no bucket of their own: a directory
(`<root>/<id[0:3]>/<id>`, filled by an atomic rename from `<root>/.tmp`) or one S3 bucket
(key `<id[0:3]>/<id>`, uploaded from `<storage_dir>/.tmp`), chosen once from the config.

Both keep the same small interface: `tmp_path` (where a download is written), `commit` (a
verified download goes in; returns its `download_url`), `delete` (the reaper's), and the local
housekeeping of the temporary files (`sweep_tmp`, `used_percent`)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from downloader.config import Config, S3Storage
from downloader.s3store import S3Store, classify_s3_error

__all__ = ["FileStore", "S3FileStore", "Store", "open_store"]


class _LocalTemp:
    """Temporary files of downloads in flight, in `<dir>/.tmp`, and the `download_url` of a job."""

    def __init__(self, tmp_parent: str | Path, download_url: str) -> None:
        self.tmp_dir = Path(tmp_parent).resolve() / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._base_url = download_url.rstrip("/")

    @staticmethod
    def relative(job_id: str) -> str:
        """A job's place in the store, as the original names it: `<id[0:3]>/<id>`."""
        return f"{job_id[:3]}/{job_id}"

    def tmp_path(self, job_id: str, claim: str) -> Path:
        """The temporary file of one claim of a job (two claims never share one)."""
        return self.tmp_dir / f"{job_id}.{claim}"

    def url(self, job_id: str) -> str:
        return f"{self._base_url}/{self.relative(job_id)}"

    @staticmethod
    def discard(path: Path) -> None:
        """Remove a file that may already be gone (a temp file, a reaped download)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def sweep_tmp(self, older_than_s: float) -> int:
        """Remove temporary files left by processors that died mid-download; returns how many.
        Only files untouched for `older_than_s` go, so live downloads are never hit."""
        cutoff = time.time() - older_than_s
        n = 0
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
        return n

    def used_percent(self) -> float:
        """How full the disk of the temporary files (and local files) is."""
        st = os.statvfs(self.tmp_dir)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return 100.0 * (total - free) / total if total else 0.0

    def close(self) -> None:
        """Release what the store holds (nothing, for a directory)."""


class FileStore(_LocalTemp):
    """Files at `<root>/<id[0:3]>/<id>`; their temp files in `<root>/.tmp`, on the same
    filesystem, so a finished download moves into place with one atomic rename."""

    def __init__(self, root: str | Path, download_url: str) -> None:
        super().__init__(root, download_url)
        self.root = Path(root).resolve()

    def path(self, job_id: str) -> Path:
        return self.root / job_id[:3] / job_id

    async def commit(self, tmp: Path, job_id: str, content_type: str) -> str:
        """Move a finished download into place atomically; returns its download_url."""
        final = self.path(job_id)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # first file of its <id[0:3]> directory
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        return self.url(job_id)

    def delete(self, job_id: str) -> None:
        self.discard(self.path(job_id))


class S3FileStore(_LocalTemp):
    """Every file in one bucket at key `<id[0:3]>/<id>` (the original's layout), deleted by the
    reaper like a local file. Downloads are written to `<storage_dir>/.tmp` and uploaded from
    there; the temporary file goes once the upload ended, whatever its outcome."""

    def __init__(
        self, cfg: S3Storage, uploads: S3Store, tmp_parent: str, download_url: str
    ) -> None:
        super().__init__(tmp_parent, download_url)
        self.bucket, self.region = cfg.bucket, cfg.region
        self.uploads = uploads

    async def commit(self, tmp: Path, job_id: str, content_type: str) -> str:
        """Upload a finished download; returns its download_url. Raises TransientError or
        PermanentError (classified as for a job's own bucket)."""
        try:
            await self.uploads.upload(
                tmp, self.bucket, self.region, self.relative(job_id), content_type
            )
        finally:
            self.discard(tmp)
        return self.url(job_id)

    def delete(self, job_id: str) -> None:
        """Delete the job's object (blocking; run it in a thread). Deleting a missing object
        succeeds. Raises TransientError or PermanentError."""
        try:
            self.uploads.delete(self.bucket, self.region, self.relative(job_id))
        except (BotoCoreError, ClientError) as exc:
            raise classify_s3_error(exc, self.bucket, "delete") from exc

    def close(self) -> None:
        self.uploads.close()


Store = FileStore | S3FileStore


def open_store(config: Config, uploads: S3Store | None) -> Store:
    """The store `processor.filestorage` names; an S3 bucket goes through `uploads` (the `s3`
    section's endpoint, credentials, timeouts and clients, shared with the jobs that name their
    own bucket when `s3.enabled`), which it needs then."""
    cfg = config.processor
    if isinstance(cfg.filestorage, S3Storage):
        assert uploads is not None, "an S3 file store needs the S3 uploads"
        return S3FileStore(cfg.filestorage, uploads, cfg.storage_dir, cfg.download_url)
    assert cfg.files_root is not None
    return FileStore(cfg.files_root, cfg.download_url)
