"""Callback backends: each delivers one payload and says how it went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Backend", "Delivery", "Payload"]

Payload = dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """The result of one attempt: delivered, or the reason it was not."""

    delivered: bool
    error: str = ""
    permanent: bool = False  # no point retrying (e.g. the backend is not configured)


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def deliver(
        self, job_id: str, event_id: str, destination: str, payload: Payload, tenant: str = ""
    ) -> Delivery:
        """One attempt; `tenant` is the job's (its own signing secret, if it has one)."""
        ...

    async def close(self, timeout_s: float) -> None: ...
