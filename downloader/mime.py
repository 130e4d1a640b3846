"""Mime patterns (`image/*,!image/gif`) and sniffing with libmagic, one instance per thread."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase

import magic

__all__ = ["SNIFF_BYTES", "MimePattern", "sniff"]

SNIFF_BYTES = 8192
"""How much of the body libmagic sees; enough for every format we verify."""

_PART = re.compile(r"^(!?)([A-Za-z0-9!#$&^_.+*?-]+)/([A-Za-z0-9!#$&^_.+*?-]+)\Z")
_local = threading.local()


@dataclass(frozen=True)
class MimePattern:
    """A parsed pattern: the download passes if no negated glob matches and, when positive
    globs exist, at least one of them does."""

    text: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> MimePattern:
        """Parse `text`; raises ValueError with a sentence saying what is wrong."""
        positive: list[str] = []
        negative: list[str] = []
        for raw in text.split(","):
            part = raw.strip()
            m = _PART.match(part)
            if not m:
                raise ValueError(
                    f"must be comma-separated mime globs like image/* or !image/gif, not {part!r}"
                )
            (negative if m.group(1) else positive).append(f"{m.group(2)}/{m.group(3)}".lower())
        return cls(text, tuple(positive), tuple(negative))

    def matches(self, mime: str) -> bool:
        mime = mime.lower()
        if any(fnmatchcase(mime, glob) for glob in self.negative):
            return False
        return not self.positive or any(fnmatchcase(mime, glob) for glob in self.positive)


def _magic() -> magic.Magic:
    m: magic.Magic | None = getattr(_local, "magic", None)
    if m is None:
        m = _local.magic = magic.Magic(mime=True)
    return m


def sniff(head: bytes) -> str:
    """The mime type of a body starting with `head` (blocking: call it in a worker thread)."""
    if not head:
        return "application/x-empty"
    return str(_magic().from_buffer(head[:SNIFF_BYTES]))
