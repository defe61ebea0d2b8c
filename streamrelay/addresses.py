"""Peer addresses as the web layer judges them: the key of the per-address limits, and
whether a request comes straight from this host."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web import server

# Headers a reverse proxy adds: their presence means the loopback peer is a proxy.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def peer_host(address: object) -> str:
    """The key the per-address limits use: the IP, or ``unix`` for unix sockets."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return "unix"


def is_loopback(address: object) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.0.0.0/104 and unix sockets."""
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return False


def is_direct_loopback(request: server.Request) -> bool:
    """A loopback peer whose request was not forwarded by a proxy on the same host."""
    headers = request.requestHeaders
    if any(headers.hasHeader(name) for name in FORWARDING_HEADERS):
        return False
    return is_loopback(request.getClientAddress())
