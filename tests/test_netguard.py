"""The address policy on its own, as properties over generated addresses: every IPv4 address
that is not public is refused in every form that embeds it, the embedding forms in use let a
public address through, and the deprecated forms are refused whatever they carry."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downloader.errors import BlockedAddressError
from downloader.netguard import NetworkPolicy, embedded_ipv4

CLOSED = NetworkPolicy(allow_private=False)

NON_PUBLIC_V4 = [
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
NON_PUBLIC_V6 = [
    IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback, IPv4-compatible
        "::ffff:0:0:0/96",  # SIIT
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo among them
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique-local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local
        "ff00::/8",  # multicast
    )
]


def v4_within(net: IPv4Network) -> st.SearchStrategy[IPv4Address]:
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(IPv4Address)


def v6_within(net: IPv6Network) -> st.SearchStrategy[IPv6Address]:
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(IPv6Address)


non_public_v4 = st.sampled_from(NON_PUBLIC_V4).flatmap(v4_within)
public_v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1)).filter(
    lambda ip: not any(ip in net for net in NON_PUBLIC_V4)
)


def v6(n: int) -> IPv6Address:
    return IPv6Address(n)


# Every way an IPv6 address can carry an IPv4 one. The first two are in use and judged by the
# IPv4 address they carry; the others are deprecated or local and refused outright.
IN_USE: dict[str, Callable[[IPv4Address], IPv6Address]] = {
    "mapped ::ffff:a.b.c.d": lambda ip: v6(0xFFFF << 32 | int(ip)),
    "NAT64 64:ff9b::a.b.c.d": lambda ip: v6(0x64FF9B << 96 | int(ip)),
}
DEPRECATED: dict[str, Callable[[IPv4Address], IPv6Address]] = {
    "compatible ::a.b.c.d": lambda ip: v6(int(ip)),
    "SIIT ::ffff:0:a.b.c.d": lambda ip: v6(0xFFFF << 48 | int(ip)),
    "local NAT64 64:ff9b:1::a.b.c.d": lambda ip: v6((0x64FF9B << 96) | (1 << 80) | int(ip)),
    "6to4 2002:aabb:ccdd::": lambda ip: v6(0x2002 << 112 | int(ip) << 80 | 1),
    "Teredo 2001:0:server:flags:~port:~client": lambda ip: v6(
        0x2001_0000 << 96
        | int(ip) << 64
        | 0x8000 << 48
        | (0xFFFF ^ 3544) << 32
        | (~int(ip) & 0xFFFF_FFFF)
    ),
}
EVERY_FORM = {**IN_USE, **DEPRECATED}


@given(ip=non_public_v4, form=st.sampled_from(sorted(EVERY_FORM)))
def test_a_non_public_ipv4_is_refused_in_every_form(ip: IPv4Address, form: str) -> None:
    """An IPv4 address that is not public is refused, alone and in every IPv6 form carrying it."""
    assert not CLOSED.permits(ip)
    assert not CLOSED.permits(EVERY_FORM[form](ip)), EVERY_FORM[form](ip)


@given(ip=public_v4, form=st.sampled_from(sorted(IN_USE)))
def test_a_public_ipv4_passes_as_it_is_ipv4_mapped_and_nat64(ip: IPv4Address, form: str) -> None:
    """A public IPv4 address is allowed as it is, IPv4-mapped, and in NAT64's 64:ff9b::/96."""
    assert CLOSED.permits(ip)
    assert CLOSED.permits(IN_USE[form](ip)), IN_USE[form](ip)
    assert embedded_ipv4(IN_USE[form](ip)) == ip


@given(ip=public_v4, form=st.sampled_from(sorted(DEPRECATED)))
def test_deprecated_forms_are_refused_whatever_they_carry(ip: IPv4Address, form: str) -> None:
    """IPv4-compatible, SIIT, local-use NAT64, 6to4 and Teredo are refused even for a public
    IPv4 address."""
    assert not CLOSED.permits(DEPRECATED[form](ip)), DEPRECATED[form](ip)


@given(ip=st.sampled_from(NON_PUBLIC_V6).flatmap(v6_within))
def test_non_global_ipv6_ranges_are_refused(ip: IPv6Address) -> None:
    """Loopback, ULA, link- and site-local, multicast, documentation, discard, SRv6, 2001::/23
    and 6to4 addresses are refused."""
    assert not CLOSED.permits(ip)


@given(ip=v6_within(IPv6Network("2400::/6")))
def test_global_unicast_ipv6_is_allowed(ip: IPv6Address) -> None:
    """Addresses of the regional registries' allocations (2400::/6) are allowed."""
    assert CLOSED.permits(ip)


@given(ip=v4_within(IPv4Network("10.0.0.0/8")))
def test_allowed_networks_open_a_network_and_its_mapped_form_only(ip: IPv4Address) -> None:
    """security.allowed_networks opens its addresses (and their IPv4-mapped form, the same host
    on a dual-stack socket); their NAT64 form stays refused (it reaches the gateway's 10/8)."""
    policy = NetworkPolicy(allow_private=False, allowed_networks=["10.0.0.0/8", "2002::/16"])
    assert policy.permits(ip)
    assert policy.permits(IN_USE["mapped ::ffff:a.b.c.d"](ip))
    assert not policy.permits(IN_USE["NAT64 64:ff9b::a.b.c.d"](ip))
    assert policy.permits(DEPRECATED["6to4 2002:aabb:ccdd::"](ip))  # opened by name


@given(ip=st.sampled_from(NON_PUBLIC_V4).flatmap(v4_within))
def test_allow_private_networks_permits_everything(ip: IPv4Address) -> None:
    """security.allow_private_networks: true turns the policy off."""
    policy = NetworkPolicy(allow_private=True)
    assert policy.permits(ip) and policy.socket_factory() is None


def test_the_socket_factory_refuses_an_embedded_loopback() -> None:
    """The connect-time check sees the NAT64 form of 127.0.0.1 and refuses it by address."""
    make = CLOSED.socket_factory()
    assert make is not None
    addr = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::7f00:1", 80, 0, 0))
    with pytest.raises(BlockedAddressError, match=r"refused to connect to 64:ff9b::7f00:1"):
        make(addr)


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("169.254.169.254", "169.254.169.254"),
        ("[::ffff:10.0.0.1]", "::ffff:a00:1"),
        ("[64:ff9b::a00:1]", "64:ff9b::a00:1"),
        ("localhost", "localhost = "),
    ],
)
async def test_a_proxied_target_is_refused_by_literal_or_by_what_it_resolves_to(
    host: str, refused: str
) -> None:
    """check_target refuses an IP literal as it is and a name by its addresses."""
    with pytest.raises(BlockedAddressError, match=re.escape(f"to {refused}")):
        await CLOSED.check_target(host, 80)


async def test_a_public_proxied_target_passes() -> None:
    """check_target lets a public IP literal through without resolving anything."""
    await CLOSED.check_target("93.184.215.14", 443)
    await CLOSED.check_target("[2606:2800:21f:cb07:6820:80da:af6b:8b2c]", 443)
