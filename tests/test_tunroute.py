"""TUN mode's addressing (ut.tunroute) and its config (tun:)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ut
from ut._testbase.certs import TestPki
from ut._testbase.tunnelkit import client_config, server_config
from ut.tunroute import AddressBook, link_local, packet_addresses


def _v4(src: str, dst: str) -> bytes:
    return bytes([0x45]) + bytes(11) + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed


def _v6(src: str, dst: str) -> bytes:
    return bytes([0x60]) + bytes(7) + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed


BOOK = AddressBook.from_entries([
    "home=10.78.0.2/32,fd78::2/128", "office=10.78.1.0/24,fd78:1::/64,10.78.1.128/25",
    "wide=172.16.0.0/12"])


def test_packet_addresses() -> None:
    assert packet_addresses(_v4("10.78.0.2", "10.78.0.1")) == (
        4, ipaddress.ip_address("10.78.0.2").packed, ipaddress.ip_address("10.78.0.1").packed)
    assert packet_addresses(_v6("fd78::2", "fd78::1"))[0] == 6  # type: ignore[index]
    for bad in (b"", b"\x45" * 19, b"\x60" * 39, b"\x10" * 60):
        assert packet_addresses(bad) is None


@pytest.mark.parametrize("dst, owner", [
    ("10.78.0.2", "home"), ("10.78.1.77", "office"), ("10.78.1.200", "office"),
    ("172.20.9.9", "wide"), ("10.78.0.3", None), ("192.168.1.1", None), ("fd78::2", "home"), ("fd78:1::9", "office"), ("fd78::3", None),
])
def test_owner_by_longest_prefix(dst: str, owner: str | None) -> None:
    addr = ipaddress.ip_address(dst)
    assert BOOK.owner_of(addr.version, addr.packed) == owner


def test_sources_are_confined_to_the_cn() -> None:
    def may(cn: str, src: str) -> bool:
        a = ipaddress.ip_address(src)
        return BOOK.may_send_from(cn, a.version, a.packed)

    assert may("home", "10.78.0.2") and may("home", "fd78::2")
    assert not may("home", "10.78.0.3") and not may("home", "10.78.1.5")
    assert may("office", "10.78.1.5") and not may("office", "10.78.0.2")
    assert not may("nobody", "10.78.0.2")


def test_overlaps_between_clients_are_refused() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        AddressBook.from_entries(["a=10.1.0.0/16", "b=10.1.2.0/24"])
    with pytest.raises(ValueError, match="twice"):
        AddressBook.from_entries(["a=10.1.0.0/16", "a=10.2.0.0/16"])
    with pytest.raises(ValueError):
        AddressBook.from_entries(["a"])


def test_link_local_packets_are_not_traffic() -> None:
    assert link_local(_v6("fe80::1", "ff02::2")) and link_local(_v6("::", "ff02::16"))
    assert link_local(_v4("10.78.0.2", "224.0.0.22")) and link_local(_v4("0.0.0.0", "255.255.255.255"))
    assert not link_local(_v6("fd78::2", "fd78::1")) and not link_local(_v4("10.78.0.2", "10.78.0.1"))


@given(st.binary(max_size=64))
def test_parsers_never_raise(data: bytes) -> None:
    parsed = packet_addresses(data)
    link_local(data)
    if parsed is not None:
        BOOK.owner_of(parsed[0], parsed[2])
        BOOK.may_send_from("home", parsed[0], parsed[1])


def test_tun_config(pki: TestPki) -> None:
    tun = {"enabled": True, "address": ["10.78.0.1/24"], "clients": ["home=10.78.0.2/32"]}
    assert server_config(pki, ("127.0.0.1", 9), _extra={"tun": tun}).tun.enabled
    with pytest.raises(ut.ConfigError, match=r"tun\.clients"):
        server_config(pki, ("127.0.0.1", 9), _extra={"tun": {**tun, "clients": []}})
    with pytest.raises(ut.ConfigError, match=r"tun\.address"):
        client_config(pki, ("127.0.0.1", 9), _extra={"tun": {"enabled": True}})
    with pytest.raises(ut.ConfigError, match=r"tun\.address"):
        client_config(pki, ("127.0.0.1", 9), _extra={"tun": {"enabled": True, "address": ["x"]}})
    with pytest.raises(ut.ConfigError, match=r"tun\.name"):
        client_config(pki, ("127.0.0.1", 9), _extra={"tun": {"name": "a name too long!"}})


def test_tun_mode_releases_are_not_paced(pki: TestPki) -> None:
    """Pacing a resequencer's large release (64 per ms) protects a userspace WireGuard's
    small UDP buffer; in TUN mode it would cap the rate near 700 Mbit/s at MTU 1380."""
    from ut.session import session_options

    tun = {"enabled": True, "address": ["10.78.0.2/24"]}
    assert session_options(client_config(pki, ("127.0.0.1", 9), _extra={"tun": tun}))[
        "pace_releases"] is False
    assert session_options(client_config(pki, ("127.0.0.1", 9)))["pace_releases"] is True
