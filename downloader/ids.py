"""Job ids: 14 base62 characters like the original's `6QEywYsd0jrKAg`: 13 random ones (77 bits)
and, last, the job's shard (see shards.py), so a job is found without a lookup."""

from __future__ import annotations

import re
import secrets
import string

__all__ = ["ALPHABET", "is_job_id", "new_job_id", "shard_of"]

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_SHAPE = re.compile(r"^[A-Za-z0-9]{14}\Z")


def new_job_id(shard: int) -> str:
    """A fresh id of a job living in `shard` (0-61)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(13)) + ALPHABET[shard]


def shard_of(job_id: str) -> int:
    """The shard a job id names (its last character)."""
    return ALPHABET.index(job_id[-1])


def is_job_id(value: str, shards: int) -> bool:
    """Whether `value` can be the id of a job of a service with `shards` shards."""
    return bool(_SHAPE.match(value)) and shard_of(value) < shards
