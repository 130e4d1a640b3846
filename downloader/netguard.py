"""The network policy: refuse connections to non-public addresses, checked at connect time.

aiohttp hands every resolved address to `socket_factory` right before connecting, for the first
request and for every redirect, whether the host was a name or an IP literal; refusing there
checks what is really dialled (no DNS-rebinding window between a check and the connect).

Through a proxy, the socket goes to the proxy only: the proxy dials the target. So the target
of every request sent through a proxy (each redirect hop, plain requests and CONNECT alike) is
also checked beforehand by `check_target`: an IP literal as it is, a name by what it resolves
to here. What the proxy itself resolves and dials stays its own responsibility (README,
Security)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from downloader.config import SecurityConfig
from downloader.errors import BlockedAddressError

__all__ = ["NetworkPolicy", "embedded_ipv4", "find_blocked"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# IPv4 addresses never dialled, whatever Python's `is_global` says in this version (3.11.7
# passes 192.0.0.0/24 but for its first 8 addresses, and 192.88.99.0/24). From the IANA IPv4
# Special-Purpose Address Registry, every block not "globally reachable", plus what it lists
# as deprecated, plus multicast and the reserved class E:
_REFUSED_V4 = (
    _V4("0.0.0.0/8"),  # "this network" (RFC 791); 0.0.0.0 reaches the local host on Linux
    _V4("10.0.0.0/8"),  # private (RFC 1918)
    _V4("100.64.0.0/10"),  # shared address space, carrier-grade NAT (RFC 6598)
    _V4("127.0.0.0/8"),  # loopback
    _V4("169.254.0.0/16"),  # link-local; cloud metadata services live at 169.254.169.254
    _V4("172.16.0.0/12"),  # private (RFC 1918)
    _V4("192.0.0.0/24"),  # IETF protocol assignments (RFC 6890): DS-Lite, NAT64 discovery...
    _V4("192.0.2.0/24"),  # documentation TEST-NET-1
    _V4("192.88.99.0/24"),  # 6to4 relay anycast, deprecated (RFC 7526)
    _V4("192.168.0.0/16"),  # private (RFC 1918)
    _V4("198.18.0.0/15"),  # benchmarking (RFC 2544)
    _V4("198.51.100.0/24"),  # documentation TEST-NET-2
    _V4("203.0.113.0/24"),  # documentation TEST-NET-3
    _V4("224.0.0.0/4"),  # multicast
    _V4("240.0.0.0/4"),  # reserved, and 255.255.255.255 limited broadcast
)

# IPv6: only global unicast (2000::/3, IANA IPv6 Address Space) is dialled, which leaves out
# loopback ::1, unspecified ::, IPv4-compatible ::a.b.c.d (::/96, deprecated by RFC 4291),
# SIIT ::ffff:0:a.b.c.d (RFC 2765, obsolete), discard-only 100::/64, local-use NAT64
# 64:ff9b:1::/48 (RFC 8215), SRv6 SIDs 5f00::/16, unique-local fc00::/7, link-local
# fe80::/10, site-local fec0::/10 (deprecated by RFC 3879) and multicast ff00::/8.
# Two forms outside it stand for an IPv4 address and are judged by that address (see
# embedded_ipv4): IPv4-mapped ::ffff:a.b.c.d and NAT64's well-known prefix 64:ff9b::/96.
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
# Inside 2000::/3, from the IANA IPv6 Special-Purpose Address Registry:
_REFUSED_V6 = (
    _V6("2001::/23"),  # IETF protocol assignments: Teredo 2001::/32 (it embeds an IPv4 server
    # and client), benchmarking 2001:2::/48, ORCHID 2001:10::/28, ORCHIDv2 2001:20::/28, and
    # a few anycast services (PCP, TURN, AMT) that serve no downloads
    _V6("2001:db8::/32"),  # documentation
    _V6("2002::/16"),  # 6to4 (deprecated by RFC 7526): it embeds an IPv4 address in bits 16-48
    _V6("3fff::/20"),  # documentation (RFC 9637)
)
_NAT64_WELL_KNOWN = _V6("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, in the two forms in use that are dialled
    as IPv6: IPv4-mapped (::ffff:a.b.c.d) and NAT64's well-known prefix (64:ff9b::a.b.c.d).
    Other embedding forms are refused outright (see _GLOBAL_UNICAST_V6 and _REFUSED_V6)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in net for net in _REFUSED_V4)


def _public_v6(ip: ipaddress.IPv6Address) -> bool:
    return (
        ip in _GLOBAL_UNICAST_V6
        and not any(ip in net for net in _REFUSED_V6)
        and ip.is_global
        and not ip.is_multicast
    )


class NetworkPolicy:
    """Which addresses outgoing downloads and callbacks may connect to."""

    @classmethod
    def from_config(cls, security: SecurityConfig) -> NetworkPolicy:
        return cls(security.allow_private_networks, security.allowed_networks)

    def __init__(self, allow_private: bool, allowed_networks: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def permits(self, ip: IPAddress) -> bool:
        """Whether `ip` may be dialled: a public address, or one in `allowed_networks`."""
        if self.allow_private:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # the same IPv4 host, on a dual-stack socket
        if any(ip in net for net in self.allowed):
            return True
        if isinstance(ip, ipaddress.IPv4Address):
            return _public_v4(ip)
        if (v4 := embedded_ipv4(ip)) is not None:
            return _public_v4(v4)
        return _public_v6(ip)

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

    async def check_target(self, host: str, port: int) -> None:
        """Raise BlockedAddressError unless `host` (an IP literal, or a name and every address
        it resolves to here) may be dialled: for a target a proxy will dial on our behalf.
        A name that does not resolve raises socket.gaierror."""
        if self.allow_private:
            return
        try:
            ips = {ipaddress.ip_address(host.strip("[]").split("%", 1)[0])}
            named = ""
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            ips = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
            named = f"{host} = "
        for ip in sorted(ips, key=str):
            if not self.permits(ip):
                raise BlockedAddressError(
                    f"refused to connect to {named}{ip} through the proxy: not a public "
                    "address (security.allow_private_networks is false)"
                )


def find_blocked(exc: BaseException | None) -> BlockedAddressError | None:
    """The policy refusal behind a client error, if that is what it was."""
    while exc is not None:
        if isinstance(exc, BlockedAddressError):
            return exc
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
    return None
