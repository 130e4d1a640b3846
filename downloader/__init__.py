"""downloader: an asynchronous, rate-limited, event-sourced download service."""

__version__ = "0.1.0"
