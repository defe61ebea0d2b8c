"""A peer's address as the core keys it, with no I/O and no web layer: the protocols
and the web gate both use it (:mod:`streamrelay.addresses` builds on it for requests)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address


def peer_host(address: object) -> str:
    """The key the per-address limits use: the IP, or ``unix`` for unix sockets."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return "unix"
