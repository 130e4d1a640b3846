"""The retry decisions and delays, as pure functions."""

from __future__ import annotations

import random

import pytest

from downloader.backoff import callback_retry_delay_s, download_retry_delay_s, should_retry_download


def test_download_delay_is_linear_in_the_attempt() -> None:
    """Retry n waits n x base (the original's rule) when jitter is off."""
    assert [download_retry_delay_s(n, 120, 10_000, jitter=0) for n in (1, 2, 3)] == [120, 240, 360]


def test_download_delay_is_capped() -> None:
    """No wait exceeds the cap."""
    assert download_retry_delay_s(50, 120, 600, jitter=0) == 600


def test_download_delay_jitter_stays_within_its_band() -> None:
    """Jitter moves a delay by at most ±jitter of itself."""
    rng = random.Random(7)
    delays = [download_retry_delay_s(1, 100, 1000, jitter=0.1, rng=rng) for _ in range(500)]
    assert min(delays) >= 90 and max(delays) <= 110 and len(set(delays)) > 100


def test_attempts_are_one_based() -> None:
    """Attempt 0 is a programming error."""
    with pytest.raises(ValueError):
        download_retry_delay_s(0, 1, 1)
    with pytest.raises(ValueError):
        callback_retry_delay_s(0, [1.0])


@pytest.mark.parametrize(
    ("attempt", "max_retries", "retriable", "expected"),
    [
        (1, 0, True, False),
        (1, 1, True, True),
        (2, 1, True, False),
        (3, 2, True, False),
        (1, 5, False, False),
    ],
)
def test_should_retry(attempt: int, max_retries: int, retriable: bool, expected: bool) -> None:
    """max_retries counts retries after the first attempt; permanent errors never retry."""
    assert should_retry_download(attempt, max_retries, retriable) is expected


def test_callback_schedule_then_exhausted() -> None:
    """Attempt n failing waits schedule[n-1]; after the last entry the callback fails."""
    schedule = [5.0, 30.0]
    assert callback_retry_delay_s(1, schedule) == 5.0
    assert callback_retry_delay_s(2, schedule) == 30.0
    assert callback_retry_delay_s(3, schedule) is None
    assert callback_retry_delay_s(1, []) is None
