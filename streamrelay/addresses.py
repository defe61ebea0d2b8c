"""Peer addresses as the web layer judges them: the key of the per-address limits,
whether a request comes straight from this host, and behind reverse proxies
(``--trust-proxy N``) the client named by the ``X-Forwarded-For`` hops they added."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.web import server

# Headers a reverse proxy adds: their presence means the loopback peer is a proxy.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


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


# -- behind reverse proxies --------------------------------------------------------------


def forwarded_hops(values: Iterable[bytes]) -> list[str]:
    """The hops of every ``X-Forwarded-For`` header, in order (several headers are one
    comma-separated list, RFC 9110 5.3); empty items are left out."""
    hops: list[str] = []
    for value in values:
        for item in value.decode("latin-1").split(","):
            item = item.strip()
            if item:
                hops.append(item)
    return hops


def hop_address(hop: str) -> str | None:
    """The IP address a hop names, normalised (an IPv4-mapped IPv6 address as IPv4), or
    None when it names none.  Taken: ``192.0.2.7``, ``192.0.2.7:4711``,
    ``2001:db8::7``, ``[2001:db8::7]`` and ``[2001:db8::7]:4711``."""
    text = hop.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not _is_port(port):
            return None
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


def forwarded_client(peer: IAddress, values: Iterable[bytes], trusted_hops: int) -> IAddress:
    """The client of a request that came from ``peer`` with these ``X-Forwarded-For``
    values, trusting the last ``trusted_hops`` hops (the proxies in front each appended
    the address it saw).

    The client is the hop ``trusted_hops`` from the right; with fewer hops, the leftmost
    (the outer proxies were not on the path).  With no trust, no header, or a chosen hop
    that names no IP address, it is ``peer``: the limits then count the proxy, never an
    address the client made up.  The port of a forwarded client is unknown: 0."""
    if trusted_hops <= 0:
        return peer
    hops = forwarded_hops(values)
    if not hops:
        return peer
    chosen = hops[-trusted_hops] if len(hops) >= trusted_hops else hops[0]
    host = hop_address(chosen)
    if host is None:
        return peer
    if ":" in host:
        return IPv6Address("TCP", host, 0)
    return IPv4Address("TCP", host, 0)


def describe_address(address: object) -> str:
    """An address for a log line: ``ip:port`` (``[ip]:port`` for IPv6), the IP alone
    when the port is unknown (a forwarded client), ``unix`` for unix sockets."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = f"[{address.host}]" if isinstance(address, IPv6Address) else address.host
        return f"{host}:{address.port}" if address.port else address.host
    if isinstance(address, UNIXAddress):
        return "unix"
    return str(address)
