"""The only package that talks to Redis: key names (keys.py), the Lua transitions
(downloader/scripts), and reads, grouped by who uses them: the API (jobs.py), processors
(work.py), notifiers and the export (callbacks.py). A Redis outage surfaces as
StorageUnavailable from every public method."""

from __future__ import annotations

from downloader.connections import connect
from downloader.storage.callbacks import CALLBACK_GROUP, CallbackStore, Takeover
from downloader.storage.jobs import JobStore
from downloader.storage.keys import Keys
from downloader.storage.work import Claim, Finish, Wakes, WorkStore

__all__ = [
    "CALLBACK_GROUP",
    "Claim",
    "Finish",
    "Keys",
    "Storage",
    "Takeover",
    "Wakes",
    "connect",
]


class Storage(JobStore, WorkStore, CallbackStore):
    """Every transition (each one Lua script, one round trip) and read, on one client."""
