"""The publisher's connection factory: its settings made into an Autobahn client factory
(the connection itself is :mod:`streamrelay.wsclient.connection`)."""

from __future__ import annotations

from typing import Any

from streamrelay.wire import SUBPROTOCOL
from streamrelay.wsclient.connection import ConnectionListener, RelayClientFactory

from .settings import USER_AGENT, PublisherSettings


def make_factory(
    listener: ConnectionListener, settings: PublisherSettings, reactor: Any
) -> RelayClientFactory:
    """The factory for one attempt to connect to ``settings.target``."""
    headers = {}
    if settings.token is not None:
        headers["Authorization"] = f"Bearer {settings.token}"
    factory = RelayClientFactory(
        listener,
        settings.target.url,
        protocols=[SUBPROTOCOL],
        headers=headers,
        useragent=USER_AGENT,
        reactor=reactor,
    )
    factory.setProtocolOptions(
        autoPingInterval=settings.ping_interval,
        autoPingTimeout=settings.ping_timeout,
        openHandshakeTimeout=settings.open_timeout,
        closeHandshakeTimeout=settings.close_timeout,
        # The relay only sends small JSON messages.
        maxMessagePayloadSize=1024 * 1024,
        maxFramePayloadSize=1024 * 1024,
        # Frames go out whole: a video frame split in fragments gains nothing.
        autoFragmentSize=0,
    )
    return factory


__all__ = ["make_factory"]
