"""Job ids: 14 random base62 characters (83 bits), like the original's `6QEywYsd0jrKAg`."""

from __future__ import annotations

import re
import secrets
import string

__all__ = ["is_job_id", "new_job_id"]

_ALPHABET = string.ascii_letters + string.digits
_SHAPE = re.compile(r"^[A-Za-z0-9]{1,64}$")


def new_job_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(14))


def is_job_id(value: str) -> bool:
    return bool(_SHAPE.match(value))
