"""Who is asking: API tokens resolved to tenants, and what each tenant may see and do.

A tenant is the name of a token in `api.tokens` (a plain-string token is the tenant `admin`;
with no tokens at all every caller is the anonymous tenant, an admin named ""). Its jobs record
the name. An admin sees and acts on everything; a `submit` tenant submits, aborts and retries
its own jobs in aggregations under its `aggr_prefix`; a `read` tenant only reads those. Another
tenant's job or aggregation does not exist for it (404, never 403)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum

from downloader.config import ApiConfig, TokenConfig

__all__ = ["ANONYMOUS", "Role", "Tenant", "Tenants"]


class Role(StrEnum):
    ADMIN = "admin"
    SUBMIT = "submit"
    READ = "read"


@dataclass(frozen=True)
class Tenant:
    """A token's tenant and what the token may do."""

    name: str
    role: Role
    aggr_prefix: str = ""
    signing_secret: str | None = None
    rate_per_second: float | None = None
    token_key: str = ""
    """Names the token (not the tenant) without revealing it: its rate bucket."""

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def may_submit(self) -> bool:
        return self.role is not Role.READ

    def sees(self, job_tenant: str) -> bool:
        """Whether a job of `job_tenant` exists for this tenant."""
        return self.is_admin or job_tenant == self.name

    def owns(self, aggr_id: str) -> bool:
        """Whether the aggregation is this tenant's to use and see."""
        return self.is_admin or aggr_id.startswith(self.aggr_prefix)

    @property
    def scope(self) -> str:
        """What its idempotency keys and quotas are counted under: its name, or "" for the
        admins and the anonymous caller, who share one space (as before tenants)."""
        return "" if self.is_admin else self.name


ANONYMOUS = Tenant("", Role.ADMIN)
"""Every caller when no token is configured."""

ADMIN_NAME = "admin"
"""The tenant of a plain-string token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tenants:
    """The configured tokens, checked in constant time."""

    def __init__(self, api: ApiConfig) -> None:
        self._entries: list[tuple[bytes, Tenant]] = []
        for entry in api.tokens:
            if isinstance(entry, str):
                digest = _digest(entry)
                tenant = Tenant(ADMIN_NAME, Role.ADMIN, token_key=digest.hex()[:16])
            else:
                digest = self._digest_of(entry)
                tenant = self._tenant_of(entry, digest.hex()[:16])
            self._entries.append((digest, tenant))

    @staticmethod
    def _digest_of(entry: TokenConfig) -> bytes:
        if entry.sha256 is not None:
            return bytes.fromhex(entry.sha256)
        assert entry.token is not None
        return _digest(entry.token)

    @staticmethod
    def _tenant_of(entry: TokenConfig, token_key: str) -> Tenant:
        return Tenant(
            entry.name,
            Role(entry.role),
            entry.aggr_prefix,
            entry.signing_secret,
            entry.rate_per_second,
            token_key,
        )

    @property
    def required(self) -> bool:
        """Whether requests need a token at all."""
        return bool(self._entries)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <token>` header, or None. Every configured
        token is compared, each in constant time (hmac.compare_digest of SHA-256 digests), so
        the time taken says nothing about which token came close."""
        if not self._entries:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer" or not token:
            return None
        presented = _digest(token)
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = tenant
        return found

    def owner_of(self, aggr_id: str) -> str:
        """The tenant whose aggr_prefix the aggregation has ("" for none): its quota counts it
        and its dashboard lists it, whoever submitted the job (an admin may act for it)."""
        for _digest, tenant in self._entries:
            if tenant.aggr_prefix and aggr_id.startswith(tenant.aggr_prefix):
                return tenant.name
        return ""

    def signing_secrets(self) -> dict[str, str]:
        """Tenant name -> its own signing secret, for those that have one."""
        return {t.name: t.signing_secret for _d, t in self._entries if t.signing_secret}
