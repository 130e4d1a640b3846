"""The network policy: refuse connections to non-public addresses, checked at connect time.

aiohttp hands every resolved address to `socket_factory` right before connecting, for the first
request and for every redirect, whether the host was a name or an IP literal; refusing there
checks what is really dialled (no DNS-rebinding window between a check and the connect)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from downloader.config import SecurityConfig
from downloader.errors import BlockedAddressError

__all__ = ["NetworkPolicy", "find_blocked"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkPolicy:
    """Which addresses outgoing downloads and callbacks may connect to."""

    @classmethod
    def from_config(cls, security: SecurityConfig) -> NetworkPolicy:
        return cls(security.allow_private_networks, security.allowed_networks)

    def __init__(self, allow_private: bool, allowed_networks: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def permits(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return True
        return ip.is_global and not ip.is_multicast

    def socket_factory(self) -> Callable[[Any], socket.socket] | None:
        """A `TCPConnector(socket_factory=...)` that enforces the policy; None when open."""
        if self.allow_private:
            return None

        def make(addr_info: Any) -> socket.socket:
            family, type_, proto, _canon, sockaddr = addr_info
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if not self.permits(ip):
                raise BlockedAddressError(
                    f"refused to connect to {ip}: not a public address "
                    "(security.allow_private_networks is false)"
                )
            return socket.socket(family=family, type=type_, proto=proto)

        return make


def find_blocked(exc: BaseException | None) -> BlockedAddressError | None:
    """The policy refusal behind a client error, if that is what it was."""
    while exc is not None:
        if isinstance(exc, BlockedAddressError):
            return exc
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
    return None
