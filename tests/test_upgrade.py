"""WebSocket handshakes answered from the request head (streamrelay.upgrade) and opened
without Autobahn's parser (streamrelay.opening): the same answers, bytes and protocol
state as the twisted.web path and Autobahn's own, for accepted and refused handshakes;
and which requests take the fast path at all."""

from __future__ import annotations

import io
from typing import Any

import pytest

from streamrelay import opening
from streamrelay.upgrade import HeadRequest
from tests.fakes import HOST, Peer, Relay
from tests.support.http import parse_response, request_head

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def head(
    target: str = "/watch/cam", extra: list[tuple[str, str]] | None = None,
    replace: dict[str, str | None] | None = None,
) -> bytes:
    """An opening handshake with a fixed key (so both paths' answers compare byte for
    byte), ``replace`` changing or (None) dropping standard headers, ``extra`` added."""
    standard: dict[str, str | None] = {
        "Host": HOST,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "streamrelay.v1",
    }
    standard.update(replace or {})
    lines = [(name, value) for name, value in standard.items() if value is not None]
    return request_head("GET", target, lines + (extra or []))


class Spy:
    """Records what the fast paths did: the requests answered from the head, and the
    handshakes opened without Autobahn's parser."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.heads: list[HeadRequest | None] = []
        self.opened: list[bool] = []
        import streamrelay.upgrade as upgrade

        real_open = upgrade.open_from_head

        def spy_open(*arguments: Any) -> bool:
            result = real_open(*arguments)
            self.opened.append(result)
            return result

        monkeypatch.setattr(upgrade, "open_from_head", spy_open)
        real_call = upgrade.HeadUpgrader.__call__

        def spy_call(upgrader: Any, channel: Any, data: bytes) -> HeadRequest | None:
            result = real_call(upgrader, channel, data)
            self.heads.append(result)
            return result

        monkeypatch.setattr(upgrade.HeadUpgrader, "__call__", spy_call)


def exchange(relay: Relay, data: bytes, host: str = "127.0.0.1") -> Peer:
    """Connect from ``host`` and send ``data`` in one read."""
    peer = relay.connect(host)
    peer.send(data)
    return peer


def without_date(written: bytes) -> bytes:
    """The response with its Date line removed (the paths format it at other times)."""
    lines = written.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"date:"))


def protocol_state(peer: Peer) -> dict[str, Any]:
    """What Autobahn's handshake decided, as later code reads it."""
    protocol = peer.protocol
    if protocol is None:
        return {}
    names = ("state", "websocket_protocol_in_use", "websocket_version", "websocket_origin",
             "http_request_host", "http_request_path", "websocket_protocols", "peer",
             "wasNotCleanReason")
    state = {name: getattr(protocol, name, None) for name in names}
    extensions = getattr(protocol, "websocket_extensions_in_use", None) or []
    state["extensions"] = [repr(extension) for extension in extensions]
    return state


# -- accepted: the fast path opens exactly what Autobahn's parser opens ----------------

ACCEPTED = {
    "plain": head(),
    "no subprotocol": head(replace={"Sec-WebSocket-Protocol": None}),
    "other subprotocols first": head(replace={"Sec-WebSocket-Protocol": "x, streamrelay.v1"}),
    "browser": head(extra=[
        ("Origin", "http://example.com:8080"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("User-Agent", "Mozilla/5.0"),
    ]),
    "host with port": head(replace={"Host": "relay.example:8443"}),
    "ipv6 host": head(replace={"Host": "[::1]:8080"}),
    "token lists": head(replace={"Connection": "keep-alive, Upgrade",
                                 "Upgrade": "websocket"}),
    "publisher": head("/publish/cam"),
    "query": head("/watch/cam?x=1&token="),
    "quoted name": head("/watch/c%61m"),
}

# Heads the relay admits but Autobahn refuses (or parses its own way): the fast path
# must leave every one of them to Autobahn's parser.
DECLINED = {
    "bad key": head(replace={"Sec-WebSocket-Key": "short=="}),
    "key not base64": head(replace={"Sec-WebSocket-Key": "!" * 22 + "=="}),
    "two keys": head(extra=[("Sec-WebSocket-Key", KEY)]),
    "no key": head(replace={"Sec-WebSocket-Key": None}),
    "version 8": head(replace={"Sec-WebSocket-Version": "8"}),
    "version text": head(replace={"Sec-WebSocket-Version": "x"}),
    "two versions": head(extra=[("Sec-WebSocket-Version", "13")]),
    "no version": head(replace={"Sec-WebSocket-Version": None}),
    "no host": head(replace={"Host": None}),
    "two hosts": head(extra=[("Host", "other")]),
    "bad port": head(replace={"Host": "relay:http"}),
    "no connection": head(replace={"Connection": None}),
    "connection close": head(replace={"Connection": "close"}),
    "duplicate subprotocols": head(replace={"Sec-WebSocket-Protocol": "a, a"}),
    "origin without host": head(extra=[("Origin", "http://")]),
    "two origins": head(extra=[("Origin", "http://a"), ("Origin", "http://b")]),
    "two extension headers": head(extra=[("Sec-WebSocket-Extensions", "permessage-deflate"),
                                         ("Sec-WebSocket-Extensions", "x")]),
    "control byte in a value": head(extra=[("X-Note", "a\x01b")]),
}


def both_ways(monkeypatch: pytest.MonkeyPatch, data: bytes) -> tuple[Peer, Peer, Spy]:
    """``data`` on a relay with the fast paths and on one with neither."""
    spy = Spy(monkeypatch)
    fast = exchange(Relay(), data)
    reference = Relay()
    reference.site.upgrade_from_head = None
    monkeypatch.setattr(opening, "AVAILABLE", False)
    slow = exchange(reference, data)
    monkeypatch.setattr(opening, "AVAILABLE", True)
    return fast, slow, spy


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_handshakes_open_as_through_autobahns_parser(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The fast path answered from the head and opened without Autobahn's parser, with
    the same 101, first messages and protocol state as the reference path."""
    fast, slow, spy = both_ways(monkeypatch, ACCEPTED[name])
    assert fast.response().status == 101, fast.written[:300]
    assert spy.heads[:1] != [None] and spy.opened == [True]
    assert fast.written == slow.written
    assert protocol_state(fast) == protocol_state(slow)


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_what_autobahn_would_refuse_is_left_to_autobahn(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Answered from the head by the relay, but opened by Autobahn's parser, which
    answers exactly as on the reference path."""
    fast, slow, spy = both_ways(monkeypatch, DECLINED[name])
    assert spy.heads[:1] != [None] and spy.opened == [False]
    assert fast.written == slow.written
    assert protocol_state(fast) == protocol_state(slow)


def test_extension_offers_are_judged_by_autobahn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed permessage-deflate offer is refused by Autobahn's succeedHandshake on
    both paths, with the same answer."""
    data = head(extra=[("Sec-WebSocket-Extensions",
                        "permessage-deflate; server_max_window_bits=99")])
    fast, slow, spy = both_ways(monkeypatch, data)
    assert spy.opened == [True]
    assert fast.response().status == 400
    assert fast.written == slow.written


def test_autobahn_without_the_private_helpers_is_asked_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the seam closed (an Autobahn without the expected internals), every
    handshake still opens, through Autobahn's own parser."""
    monkeypatch.setattr(opening, "AVAILABLE", False)
    spy = Spy(monkeypatch)
    relay = Relay()
    peer = exchange(relay, head())
    assert peer.response().status == 101
    assert spy.opened == [False]


def test_bytes_after_the_head_reach_the_websocket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame sent in the same read as the head is parsed once the socket is open."""
    from tests.support.frames import close_frame

    spy = Spy(monkeypatch)
    relay = Relay()
    peer = exchange(relay, head() + close_frame(1000))
    assert spy.opened == [True]
    assert peer.close_codes() == [1000]
    assert peer.channel.bytes_in == len(close_frame(1000))


# -- which requests take the fast path -------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        head()[:-1],  # incomplete
        request_head("GET", "/healthz", {"Host": HOST}),
        request_head("GET", "/watch/cam", {"Host": HOST}),  # no Upgrade: 426 by twisted.web
        head().replace(b"GET", b"POST", 1),
        head().replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        head().replace(b"Host:", b"Host :", 1),
        head().replace(b"\r\nHost", b"\r\n Host", 1),  # obs-fold
        head(extra=[("Content-Length", "0")]),
        head(extra=[("Transfer-Encoding", "chunked")]),
        head(extra=[("X-Long", "x" * 9000)]),
    ],
    ids=["incomplete", "healthz", "no-upgrade", "post", "http10", "space-colon", "fold",
         "content-length", "chunked", "long-line"],
)
def test_everything_else_goes_through_twisted_web(
    monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    """Declined heads are parsed by twisted.web from their first byte: the answer is
    the reference path's."""
    spy = Spy(monkeypatch)
    fast = exchange(Relay(), data)
    reference = Relay()
    reference.site.upgrade_from_head = None
    slow = exchange(reference, data)
    assert spy.heads == [None]
    assert without_date(fast.written) == without_date(slow.written)


def test_a_head_in_two_reads_is_served_by_twisted_web(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first read is looked at; the rest of a split head still opens."""
    spy = Spy(monkeypatch)
    relay = Relay()
    peer = relay.connect()
    data = head()
    peer.send(data[:20])
    peer.send(data[20:])
    assert peer.response().status == 101
    assert spy.heads == [None]


def test_endpoints_with_auth_url_go_through_twisted_web(monkeypatch: pytest.MonkeyPatch) -> None:
    """--auth-url holds the request while it asks: that stays on the twisted.web path."""
    spy = Spy(monkeypatch)
    relay = Relay.with_options(auth_url="http://127.0.0.1:9/auth", auth_timeout=0.1)
    exchange(relay, head())
    assert spy.heads == [None]


# -- refusals from the head ------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], bytes, int]] = {
    "404": ({}, head("/watch/cam/extra"), 404),
    "400 name": ({}, head("/watch/c$m"), 400),
    "426 upgrade value": ({}, head(replace={"Upgrade": "h2c"}), 426),
    "503 rate": ({"max_handshakes_per_ip": 1.0, "handshake_burst": 1}, head(), 503),
    "403 origin": ({}, head("/publish/cam", [("Origin", "http://x")]), 403),
    "403 loopback": ({}, head("/publish/cam"), 403),
    "401 token": ({"view_secret": b"s" * 32}, head(), 401),
    "403 relay": ({}, head("/relay/cam"), 403),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_from_the_head_answer_as_twisted_web_did(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Status, reason and the documented headers are the reference path's; the answer
    says Connection: close and no-store, and the connection closes at once (nothing was
    left unread: no lingering timer)."""
    options, data, status = REFUSED[name]
    spy = Spy(monkeypatch)

    def refused(relay: Relay) -> Peer:
        # The rate limit lets a burst through: spend it first.
        peer = exchange(relay, data, "10.0.0.1")
        for _ in range(5):
            if peer.response().status == status:
                break
            peer = exchange(relay, data, "10.0.0.1")
        return peer

    try:
        fast_relay = Relay.with_options(**options)
    except TypeError:
        pytest.fail(f"unknown option in {options}")
    fast = refused(fast_relay)
    reference = Relay.with_options(**options)
    reference.site.upgrade_from_head = None
    slow = refused(reference)
    got, want = fast.response(), slow.response()
    assert got.status == want.status == status
    assert got.body == want.body
    for name_ in ("content-type", "retry-after", "upgrade", "cache-control"):
        assert got.header(name_) == want.header(name_), name_
    assert got.header("date") and got.header("connection") == "close"
    assert isinstance(spy.heads[-1], HeadRequest)
    assert fast.transport.disconnecting and not fast.transport.write_closed
    assert fast.protocol is None
    assert fast.channel._lingering is None


def test_a_refusal_with_unread_bytes_lingers() -> None:
    """Bytes after the head may still be in flight: the answer is followed by a
    half-close and the lingering read, as for the channel's own refusals."""
    relay = Relay.with_options(max_handshakes_per_ip=1.0, handshake_burst=1)
    for _ in range(3):
        peer = exchange(relay, head() + b"\x81\x80\x00\x00\x00\x00", "10.0.0.1")
    assert peer.response().status == 503
    assert peer.transport.write_closed and not peer.aborted
    relay.tick(relay.config.close_timeout + 1)
    assert peer.aborted


class _KeptOpen(io.StringIO):
    def close(self) -> None:
        pass


def test_refusals_from_the_head_are_counted_and_access_logged() -> None:
    """Every refusal counts in /metrics; the access log gets the request without its
    query string, in the combined format."""
    relay = Relay.with_options(view_secret=b"s" * 32)
    buffer = _KeptOpen()
    relay.site.startFactory()
    relay.site.logFile = buffer
    try:
        peer = exchange(relay, head("/watch/cam?token=secret-value", [("User-Agent", "ua")]))
    finally:
        relay.site.stopFactory()
    assert peer.response().status == 401
    text = relay.context.metrics.exposition(None)[0].decode()
    assert 'streamrelay_handshakes_refused_total{status="401"} 1.0' in text
    line = buffer.getvalue()
    assert '"GET /watch/cam HTTP/1.1" 401 ' in line and '"ua"' in line
    assert "secret-value" not in line


def test_the_answer_parses_as_one_response() -> None:
    """A refusal from the head is a complete HTTP/1.1 response whose length matches."""
    relay = Relay()
    peer = exchange(relay, head("/watch/cam/extra"))
    response = parse_response(peer.written, until_close=True)
    assert response is not None and response.status == 404
    assert response.body == b"not found\n"


def test_the_hand_over_sets_what_the_gate_sets_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-request protocol settings of StreamGate's hand-over (``?abr=1`` viewers, where
    the admission layer offers ``wants_abr``) are set on the fast path too."""
    from streamrelay import admission

    def wants_abr(request: Any) -> bool:
        return bool((request.args or {}).get(b"abr") == [b"1"])

    monkeypatch.setattr(admission, "wants_abr", wants_abr, raising=False)
    relay = Relay()
    adaptive = exchange(relay, head("/watch/cam?abr=1"))
    plain = exchange(relay, head("/watch/cam"))
    assert adaptive.response().status == plain.response().status == 101
    assert getattr(adaptive.protocol, "abr", False) is True
    assert getattr(plain.protocol, "abr", False) is False
