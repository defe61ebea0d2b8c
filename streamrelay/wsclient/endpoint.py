"""How a client reaches a relay: TCP, and TLS for ``wss://``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

from .target import RelayTarget


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS without certificate verification (``--insecure``), still sending SNI."""

    def __init__(self, hostname: str) -> None:
        from OpenSSL import SSL
        from twisted.internet.ssl import CertificateOptions

        self._ssl = SSL
        self._hostname = hostname
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> Any:  # noqa: N802 (interface)
        """Make an OpenSSL connection object for one TLS client connection."""
        connection = self._ssl.Connection(self._context, None)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_app_data(tlsProtocol)
        return connection


def default_endpoint(
    reactor: Any, target: RelayTarget, insecure: bool = False, timeout: float = 10.0
) -> IStreamClientEndpoint:
    """A TCP (and for wss://, TLS) endpoint to the relay; certificates are verified
    against the system trust store unless ``insecure``."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, target.host, target.port, timeout=timeout
    )
    if target.secure:
        from twisted.internet.ssl import optionsForClientTLS

        creator: Any = (
            _UnverifiedClientTLS(target.host) if insecure else optionsForClientTLS(target.host)
        )
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


EndpointFactory = Callable[[Any, RelayTarget, bool], IStreamClientEndpoint]
"""Makes the endpoint for one connection attempt: ``(reactor, target, insecure)``."""

__all__ = ["EndpointFactory", "default_endpoint"]
