"""The WebSocket upgrade straight from the request head, without twisted.web.

A WebSocket opening handshake needs none of twisted.web's request machinery (the
``Request`` object, its response headers, resource traversal, the producer dance): the
relay answers it from the head alone.  :class:`HeadUpgrader` takes the first bytes of a
connection; when they hold a complete, plainly well-formed ``GET ... HTTP/1.1`` head
with an ``Upgrade`` header on one of the WebSocket endpoints, it runs the very same
admission checks (:func:`streamrelay.admission.admit`, the refusal table of
``docs/protocol.md``) on a :class:`HeadRequest` -- a small stand-in offering what the
checks and the access log read of a request -- and then either refuses with a pre-built
answer or hands the connection to Autobahn as :class:`~streamrelay.admission.StreamGate`
does.

Anything else takes the ordinary path through twisted.web, whose behaviour therefore
stays the reference: a head split over several reads, any head over a bound (431), one
announcing a body (413), one twisted.web would refuse or parse its own way (400:
obs-fold, odd spacing, a header name that is not a token, NUL/CR/LF in a value, another
method or version), keep-alive requests after the first, endpoints that ask
``--auth-url`` (asynchronous), and every plain HTTP path.  Declining is always safe:
the head is then parsed from scratch by twisted.web.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any, cast

from twisted.internet.interfaces import IAddress
from twisted.web.http import parse_qs, unquote

from streamrelay import admission
from streamrelay.addresses import forwarded_client
from streamrelay.admission import Endpoint, Handshake
from streamrelay.channel import RelayChannel
from streamrelay.context import RelayContext
from streamrelay.opening import open_from_head

# A plain GET head (without its final blank line), validated in one pass: the request
# line with an origin-form target free of spaces and controls, then header lines whose
# name is a token (RFC 9110 5.6.2) and whose value holds no NUL, CR or LF (5.5).
_PLAIN_GET = re.compile(
    rb"GET /[^\x00-\x20\x7f]* HTTP/1\.1"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00\r\n]*)*\Z"
)
# Headers that announce a body (413 or a 400 for bad framing): twisted.web's to judge.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Headers Autobahn never sees: the token was checked in the HTTP handshake already.
_NOT_REPLAYED = frozenset({b"authorization", b"proxy-authorization"})


class _HeadHeaders:
    """The parts of twisted.web's ``Headers`` the admission checks and the access log
    use, over a name -> raw values mapping (names lower-case)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[bytes, list[bytes]]) -> None:
        self._raw = raw

    @staticmethod
    def _key(name: str | bytes) -> bytes:
        return (name.encode("latin-1") if isinstance(name, str) else name).lower()

    def hasHeader(self, name: str | bytes) -> bool:  # noqa: N802 - twisted.web's name
        """Whether the request carried ``name``."""
        return self._key(name) in self._raw

    def getRawHeaders(self, name: str | bytes, default: Any = None) -> Any:  # noqa: N802
        """Every value of ``name`` in order, as ``str`` when asked by a ``str`` name
        (decoded as twisted.web does), else ``default``."""
        values = self._raw.get(self._key(name))
        if values is None:
            return default
        if isinstance(name, str):
            return [value.decode("utf8") for value in values]
        return list(values)


class HeadRequest:
    """A WebSocket opening request parsed from its head: what the admission checks, the
    hand-over to Autobahn and the access log read of a ``twisted.web`` request."""

    clientproto = b"HTTP/1.1"
    method = b"GET"

    def __init__(
        self,
        channel: RelayChannel,
        uri: bytes,
        headers: dict[bytes, list[bytes]],
        lines: list[bytes],
    ) -> None:
        self.channel = channel
        self.client: IAddress = channel.peer_address
        self.uri = uri
        self.path, _, self._query = uri.partition(b"?")
        segments = [unquote(segment) for segment in self.path[1:].split(b"/")]
        self.prepath = segments[:1]
        self.postpath = segments[1:]
        self.headers = headers
        self.requestHeaders = _HeadHeaders(headers)
        # The header lines as received, for the replay to Autobahn.
        self.lines = lines
        self.code = 200
        self.sentLength = 0

    @cached_property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's arguments, parsed as twisted.web parses them (blank values kept)."""
        return parse_qs(self._query, 1) if self._query else {}

    def getHeader(self, name: str | bytes) -> Any:  # noqa: N802 - twisted.web's name
        """The last value of ``name`` (``str`` for a ``str`` name), or None."""
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> IAddress:  # noqa: N802 - twisted.web's name
        """As :meth:`streamrelay.web.RelayRequest.getClientAddress`: the TCP peer, or
        with ``--trust-proxy N`` the client the trusted proxies forwarded."""
        trusted = self.channel.context.config.trust_proxy
        if not trusted:
            return self.client
        values = self.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        return forwarded_client(self.client, values, trusted)

    def replay(self) -> bytes:
        """The head Autobahn is given: the path without its query, and without the
        credential headers (both may carry a token; Autobahn logs requests at debug
        level)."""
        kept = [self.method + b" " + self.path + b" HTTP/1.1"]
        for line in self.lines:
            name = line.split(b":", 1)[0].lower()
            if name not in _NOT_REPLAYED:
                kept.append(line)
        return b"\r\n".join(kept) + b"\r\n\r\n"

    def __repr__(self) -> str:
        """Method and path only (the query may carry a token)."""
        return f"<HeadRequest path={self.path.decode('utf-8', 'replace')}>"


def parse_head(
    channel: RelayChannel, head: bytes, max_line: int, max_bytes: int, max_lines: int
) -> HeadRequest | None:
    """``head`` (without its final blank line) as a :class:`HeadRequest`, or None when
    it is anything but a plain, well-formed ``GET`` within the bounds -- twisted.web
    then parses it and gives whatever answer it deserves."""
    if len(head) + 4 > max_bytes or not _PLAIN_GET.match(head):
        return None
    lines = head.split(b"\r\n")
    if len(lines) - 1 > max_lines or max(map(len, lines)) > max_line:
        return None
    uri = lines[0][4:-9]
    headers: dict[bytes, list[bytes]] = {}
    header_lines = lines[1:]
    for line in header_lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _FRAMING:
            return None
        headers.setdefault(name, []).append(value.strip(b" \t"))
    if b"upgrade" not in headers:
        return None
    return HeadRequest(channel, uri, headers, header_lines)


class HeadUpgrader:
    """Answers WebSocket opening handshakes from the first read of a connection (see
    the module's docstring); :meth:`RelaySite.upgrade_from_head` calls it."""

    def __init__(self, context: RelayContext, endpoints: list[Endpoint]) -> None:
        self.context = context
        # Only synchronous endpoints: --auth-url holds the request while it asks.
        self._endpoints = {
            endpoint.path: endpoint for endpoint in endpoints if endpoint.authorizer is None
        }

    def __call__(self, channel: RelayChannel, data: bytes) -> HeadRequest | None:
        """Handle ``data``, the connection's first bytes; the request it answered, or
        None to let twisted.web parse ``data`` as usual."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        config = self.context.config
        request = parse_head(
            channel, data[:end], config.max_header_line_bytes, config.max_header_bytes,
            config.max_header_lines,
        )
        if request is None or not request.prepath:
            return None
        endpoint = self._endpoints.get(request.prepath[0])
        if endpoint is None:
            return None
        channel.head_received()
        if config.trust_proxy:
            channel._move_to_client(request.getClientAddress())
        handshake = handshake_for(endpoint, self.context, request)
        refusal = admission.admit(handshake)
        if refusal is not None:
            channel.refuse(
                refusal.status, refusal.reason, refusal.retry_after, request=request,
                drained=end + 4 == len(data),
            )
            return request
        self._hand_over(channel, handshake, request, data[end + 4 :], end + 4)
        return request

    def _hand_over(
        self,
        channel: RelayChannel,
        handshake: Handshake,
        request: HeadRequest,
        rest: bytes,
        head_bytes: int,
    ) -> None:
        # What StreamGate._hand_over does, from the head.
        client = request.getClientAddress()
        # The same protocol, set up the same way, as twisted.web's path builds.
        protocol = admission.build_protocol(handshake.endpoint, handshake.stream, request, client)
        channel.upgrade(protocol)
        # Autobahn's handshake from the parsed head (streamrelay.opening), or, where
        # that declines, from the head replayed to Autobahn's own parser.
        seen = {name: values for name, values in request.headers.items()
                if name not in _NOT_REPLAYED}
        if not open_from_head(protocol, request.path, seen, head_bytes):
            protocol.dataReceived(request.replay())
        if protocol.is_open.called:
            channel.websocket_opened(protocol, client)
        else:
            # Autobahn refused the handshake itself (a bad Sec-WebSocket-* header).
            self.context.metrics.refused(400)
        if rest and channel.upgraded is protocol:
            channel.dataReceived(rest)


def handshake_for(
    endpoint: Endpoint, context: RelayContext, request: HeadRequest
) -> Handshake:
    """The admission record of ``request`` (typed as twisted.web's request: the checks
    read only what :class:`HeadRequest` offers)."""
    return Handshake(endpoint, context, cast(Any, request), request.channel)

