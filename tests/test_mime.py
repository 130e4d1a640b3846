"""Mime patterns and sniffing."""

from __future__ import annotations

import pytest

from downloader.mime import MimePattern, sniff
from tests.images import gif, jpeg, png


@pytest.mark.parametrize(
    ("pattern", "mime", "ok"),
    [
        ("image/*", "image/png", True),
        ("image/*", "text/plain", False),
        ("!image/png", "image/png", False),
        ("!image/png", "text/plain", True),
        ("!image/vnd.adobe.photoshop,image/*", "image/jpeg", True),
        ("!image/vnd.adobe.photoshop,image/*", "image/vnd.adobe.photoshop", False),
        ("image/jpeg, image/png", "image/png", True),
        ("IMAGE/PNG", "image/png", True),
        ("*/*", "application/x-empty", True),
    ],
)
def test_pattern_matching(pattern: str, mime: str, ok: bool) -> None:
    """A type passes when no negation matches and some positive glob (if any) does."""
    assert MimePattern.parse(pattern).matches(mime) is ok


@pytest.mark.parametrize("bad", ["image", "", "image/png,", "!", "image/png/x", "im age/png"])
def test_malformed_patterns_are_refused(bad: str) -> None:
    """A malformed pattern raises ValueError."""
    with pytest.raises(ValueError):
        MimePattern.parse(bad)


def test_sniffing_reads_content_not_names() -> None:
    """libmagic identifies images from their bytes; empty is application/x-empty."""
    assert sniff(png(2, 2)) == "image/png"
    assert sniff(jpeg(2, 2)) == "image/jpeg"
    assert sniff(gif(2, 2)) == "image/gif"
    assert sniff(b"") == "application/x-empty"
    assert sniff(b"hello\n").startswith("text/")
