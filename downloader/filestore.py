"""The filesystem store: `<root>/<id[0:3]>/<id>`, filled by an atomic rename from `<root>/.tmp`."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["FileStore"]


class FileStore:
    def __init__(self, root: str | Path, download_url: str) -> None:
        self.root = Path(root).resolve()
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._base_url = download_url.rstrip("/")

    def path(self, job_id: str) -> Path:
        return self.root / job_id[:3] / job_id

    def tmp_path(self, job_id: str, claim: str) -> Path:
        """The temporary file of one claim of a job (two claims never share one)."""
        return self.tmp_dir / f"{job_id}.{claim}"

    def url(self, job_id: str) -> str:
        return f"{self._base_url}/{job_id[:3]}/{job_id}"

    def commit(self, tmp: Path, job_id: str) -> None:
        """Move a finished download into place atomically (same filesystem)."""
        final = self.path(job_id)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # first file of its <id[0:3]> directory
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)

    def delete(self, job_id: str) -> None:
        self.discard(self.path(job_id))

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
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return 100.0 * (total - free) / total if total else 0.0
