"""Autobahn's server opening handshake from a request head the relay has parsed already.

Autobahn has no public entry for a handshake whose request is already parsed: its
``processHandshake`` parses the head again (with debug lines whose arguments it formats
either way), validates it, builds a ``ConnectionRequest``, calls ``onConnect`` through
a Deferred and then ``succeedHandshake`` -- about a fifth of an accepted handshake's
CPU in the relay.  :func:`open_from_head` does the same validation on the headers the
relay parsed, sets what ``processHandshake`` sets, and calls ``onConnect`` and
``succeedHandshake`` (which answers 101, negotiates extensions and opens) directly.

That reads and writes attributes Autobahn does not document (``_wskey``,
``websocket_*``, ``http_*``) and uses two of its private helpers for the Origin header,
so it sits behind a seam: it runs only when :data:`AVAILABLE` (the helpers import and
the protocol class has the expected members) and only for a request every one of
Autobahn's checks would pass, mirrored check by check below.  For anything else it
returns False before touching the protocol, and the caller replays the head to
Autobahn's own parser, whose answer (a 400, 405, 505...) stays the reference.
``tests/test_opening.py`` runs the same handshakes both ways and compares the protocol
state and the bytes on the wire.
"""

from __future__ import annotations

import re
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from streamrelay import logs

_log = Logger(observer=logs.limited)

try:  # Autobahn's private helpers for the Origin header (see the module docstring).
    from autobahn.websocket.protocol import (
        WebSocketServerProtocol,
        _is_same_origin,
        _url_to_origin,
    )

    AVAILABLE = all(
        callable(getattr(WebSocketServerProtocol, name, None))
        for name in ("succeedHandshake", "failHandshake", "_parseExtensionsHeader", "onConnect")
    ) and isinstance(getattr(WebSocketServerProtocol, "STATE_CONNECTING", None), int)
except ImportError:  # pragma: no cover - an Autobahn without them: always fall back
    AVAILABLE = False

# Autobahn's parseHttpHeader: a field value holds VCHAR, obs-text, SP and HTAB only.
_VALUE_INVALID = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")
_BASE64 = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")


def _tokens(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def open_from_head(
    protocol: Any, path: bytes, headers: dict[bytes, list[bytes]], head_bytes: int
) -> bool:
    """Run ``protocol``'s opening handshake for a ``GET path HTTP/1.1`` request with
    ``headers`` (lower-case names, raw values in order, as the relay parsed them; the
    head was ``head_bytes`` long) when Autobahn would accept it; True when done (the
    101 is written and the protocol open, or ``onConnect`` refused it), False -- with
    the protocol untouched -- when Autobahn must parse the head itself."""
    if not AVAILABLE or protocol.state != protocol.STATE_CONNECTING or protocol.data:
        return False
    if protocol.trustXForwardedFor or protocol.maxConnections or protocol.factory.externalPort:
        return False
    text_path = path.decode("iso-8859-1")
    # urlparse would find a netloc in "//x" or a fragment after "#": Autobahn's to judge.
    if text_path.startswith("//") or "#" in text_path or ";" in text_path:
        return False
    # The headers as Autobahn's parseHttpHeader makes them: repeated ones joined.
    http_headers: dict[str, str] = {}
    counts: dict[str, int] = {}
    for raw_name, raw_values in headers.items():
        for value in raw_values:
            if _VALUE_INVALID.search(value):
                return False
        name = raw_name.decode("iso-8859-1")
        http_headers[name] = ", ".join(value.decode("iso-8859-1") for value in raw_values)
        counts[name] = len(raw_values)

    # Host: exactly one; a port, if any, must be a number.
    if counts.get("host") != 1:
        return False
    host = http_headers["host"].strip()
    if ":" in host and not host.endswith("]"):
        host, port = host.rsplit(":", 1)
        try:
            int(port.strip())
        except ValueError:
            return False
    # Upgrade: websocket; Connection: upgrade (as tokens of comma-separated lists).
    if "websocket" not in _tokens(http_headers.get("upgrade", "")):
        return False
    if "upgrade" not in _tokens(http_headers.get("connection", "")):
        return False
    # Sec-WebSocket-Version: exactly one, a version Autobahn speaks.
    if counts.get("sec-websocket-version") != 1:
        return False
    try:
        version = int(http_headers["sec-websocket-version"])
    except ValueError:
        return False
    if version not in protocol.versions or version < 13:
        return False
    # Sec-WebSocket-Protocol: no duplicates.
    protocols: list[str] = []
    if "sec-websocket-protocol" in http_headers:
        protocols = [item.strip() for item in http_headers["sec-websocket-protocol"].split(",")]
        if len(set(protocols)) != len(protocols):
            return False
    # Origin: at most one, parseable, and allowed by the factory's patterns.
    origin = ""
    if "origin" in http_headers:
        if counts["origin"] > 1:
            return False
        origin = http_headers["origin"].strip()
        try:
            origin_tuple = _url_to_origin(origin)
        except ValueError:
            return False
        factory = protocol.factory
        if not (origin_tuple == "null" and factory.allowNullOrigin) and not _is_same_origin(
            origin_tuple,
            "https" if factory.isSecure else "http",
            factory.externalPort or factory.port,
            protocol.allowedOriginsPatterns,
        ):
            return False
    # Sec-WebSocket-Key: exactly one, 16 bytes of base64.
    if counts.get("sec-websocket-key") != 1:
        return False
    key = http_headers["sec-websocket-key"].strip()
    if len(key) != 24 or key[-2:] != "==" or not set(key[:-2]) <= _BASE64:
        return False
    # Sec-WebSocket-Extensions: at most one (offers are judged by succeedHandshake).
    if counts.get("sec-websocket-extensions", 0) > 1:
        return False

    # Every check passed: what processHandshake sets, then what it calls.
    extensions: list[Any] = []
    if "sec-websocket-extensions" in http_headers:
        extensions = protocol._parseExtensionsHeader(http_headers["sec-websocket-extensions"])
    protocol.trafficStats.preopenIncomingOctetsWireLevel += head_bytes
    protocol.http_request_data = None  # the raw head is not kept (RelayProtocol drops it)
    protocol.http_status_line = f"GET {text_path} HTTP/1.1"
    protocol.http_headers = http_headers
    protocol.http_request_uri = text_path
    protocol.http_request_path = text_path
    protocol.http_request_params = {}
    protocol.http_request_host = host
    protocol.websocket_version = version
    protocol.websocket_origin = origin
    protocol.websocket_protocols = protocols
    protocol.websocket_extensions = extensions
    protocol._wskey = key
    request = ConnectionRequest(
        protocol.peer, http_headers, host, text_path, {}, version, origin, protocols,
        extensions,
    )
    try:
        accepted = protocol.onConnect(request)
    except ConnectionDeny as deny:
        protocol.failHandshake(deny.reason, deny.code)
        return True
    except Exception as error:  # what Autobahn answers to an error in onConnect
        _log.failure("Unexpected exception in onConnect")
        protocol.failHandshake(
            f"Internal server error: {error}", ConnectionDeny.INTERNAL_SERVER_ERROR
        )
        return True
    if isinstance(accepted, Deferred):
        accepted.addCallbacks(protocol.succeedHandshake, lambda failure: _deny(protocol, failure))
    else:
        protocol.succeedHandshake(accepted)
    return True


def _deny(protocol: Any, failure: Any) -> None:
    # An onConnect that answered through a Deferred and failed: as Autobahn does.
    if isinstance(failure.value, ConnectionDeny):
        protocol.failHandshake(failure.value.reason, failure.value.code)
    else:
        protocol.failHandshake(
            f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR
        )
