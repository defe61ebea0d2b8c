"""What one open connection keeps and costs: Autobahn's options live on a per-endpoint
class (not copied into, nor formatted for, every connection), the opening handshake
and the upgrade request are let go once open, and leak tracking only runs when
/api/internals is on."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.websocket import protocol as websocket_protocol

from streamrelay.protocol import PublisherProtocol, ViewerProtocol
from tests.fakes import Relay

# The server options Autobahn would copy from the factory into each protocol.
OPTIONS = set(websocket_protocol.WebSocketServerProtocol.CONFIG_ATTRS)


def test_options_are_not_copied_into_each_connection() -> None:
    """No Autobahn option sits in a connection's own attributes; each still reads the
    endpoint's value."""
    relay = Relay()
    viewer: Any = relay.viewer().protocol
    publisher: Any = relay.publisher().protocol
    for protocol, factory in ((viewer, viewer.factory), (publisher, publisher.factory)):
        assert not OPTIONS & set(vars(protocol))
        for name in OPTIONS:
            assert getattr(protocol, name) == getattr(factory, name), name
    # The endpoints' bounds differ, so each has its own class.
    assert viewer.maxMessagePayloadSize == 4096
    assert publisher.maxMessagePayloadSize == relay.config.max_message_bytes
    assert isinstance(viewer, ViewerProtocol) and type(viewer).__name__ == "ViewerProtocol"
    assert isinstance(publisher, PublisherProtocol)


def test_options_are_not_formatted_for_each_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autobahn pretty-prints its options for a debug line on every connection (even
    with debug logging off); the relay's connections give it nothing to format."""
    formatted: list[Any] = []

    def counting_pformat(value: Any, *arguments: Any, **keywords: Any) -> str:
        formatted.append(value)
        return ""

    monkeypatch.setattr(websocket_protocol, "pformat", counting_pformat)
    relay = Relay()
    relay.viewer()
    relay.publisher()
    assert formatted == [[], []]


def test_the_opening_handshake_is_let_go_once_open() -> None:
    """After the 101 the connection keeps neither the request head, its headers and the
    response (Autobahn's copies) nor twisted.web's request object."""
    relay = Relay()
    peer = relay.viewer()
    protocol: Any = peer.protocol
    for name in ("http_request_data", "http_response_data", "http_headers", "_wskey"):
        assert getattr(protocol, name) is None, name
    assert peer.channel.requests == []
    # The connection works as before: the viewer got its status.
    assert peer.json_messages()[0] == {"type": "status", "state": "offline"}


def test_autobahn_send_queue_is_an_immutable_empty_one() -> None:
    """The relay never makes sync or chopped sends: Autobahn's send queue is an empty
    tuple, read as empty and impossible to append to."""
    relay = Relay()
    protocol: Any = relay.viewer().protocol
    assert protocol.send_queue == ()
    protocol.sendPing(b"x")
    protocol.close_with(1000, "bye")
    assert protocol.send_queue == ()


def test_leak_tracking_only_with_api_internals() -> None:
    """Channels and protocols are tracked (a weak reference each) only when
    /api/internals can report them."""
    plain = Relay()
    plain.viewer()
    assert len(plain.context.live_objects) == 0
    tracked = Relay.with_options(api_internals=True)
    tracked.viewer()
    assert {type(item).__name__ for item in tracked.context.live_objects} == {
        "RelayChannel",
        "ViewerProtocol",
    }
