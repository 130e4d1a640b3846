"""Every retry decision and delay: pure functions, tested on their own."""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["callback_retry_delay_s", "download_retry_delay_s", "should_retry_download"]


def download_retry_delay_s(
    attempt: int, base_s: float, cap_s: float, jitter: float = 0.1, rng: random.Random | None = None
) -> float:
    """Wait before retry `attempt` (1-based) of a download: attempt x base, capped, ±jitter.

    Linear like the original service (retry n waits n x 120 s there); jitter spreads the retries
    of a burst of failures so they do not hit the origin at the same instant."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    delay = min(attempt * base_s, cap_s)
    if jitter:
        delay *= 1 + (rng or random).uniform(-jitter, jitter)
    return max(0.0, delay)


def should_retry_download(attempt: int, max_retries: int, retriable: bool) -> bool:
    """Attempt `attempt` (1-based) failed: try again? max_retries=2 allows three attempts."""
    return retriable and attempt <= max_retries


def callback_retry_delay_s(attempt: int, schedule_s: Sequence[float]) -> float | None:
    """Wait before the next callback attempt after attempt `attempt` failed; None when the
    schedule is used up (attempts = 1 + len(schedule))."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    return schedule_s[attempt - 1] if attempt <= len(schedule_s) else None
