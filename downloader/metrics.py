"""Prometheus metrics of every role; one registry per process (in `run` mode it covers all)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CALLBACKS",
    "CALLBACK_SECONDS",
    "DOWNLOADS",
    "DOWNLOAD_BYTES",
    "DOWNLOAD_SECONDS",
    "JOBS_ACCEPTED",
    "PAUSED",
    "S3_UPLOAD_SECONDS",
    "WORKERS",
]

JOBS_ACCEPTED = Counter("downloader_jobs_accepted_total", "Jobs accepted by POST /download")
DOWNLOADS = Counter(
    "downloader_download_attempts_total", "Download attempts by outcome", ["outcome"]
)
DOWNLOAD_SECONDS = Histogram(
    "downloader_download_seconds",
    "Duration of one download attempt",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DOWNLOAD_BYTES = Counter("downloader_download_bytes_total", "Bytes stored")
S3_UPLOAD_SECONDS = Histogram(
    "downloader_s3_upload_seconds",
    "Duration of one upload to S3, successful or not",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WORKERS = Gauge("downloader_processor_workers", "Downloads in flight in this process")
PAUSED = Gauge("downloader_processor_paused", "1 while the disk is too full to take jobs")
CALLBACKS = Counter(
    "downloader_callback_attempts_total",
    "Callback attempts by backend and outcome",
    ["backend", "outcome"],
)
CALLBACK_SECONDS = Histogram(
    "downloader_callback_seconds",
    "Duration of one callback attempt",
    ["backend"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60),
)
