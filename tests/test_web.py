"""The HTTP side of the one port: every refusal in the documented order, the plain
endpoints and the access log, driven through the real Site with StringTransports."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from streamrelay.admission import CHECKS
from streamrelay.tokens import make_token
from streamrelay.wire import FLAG_KEY, encode_media
from tests.fakes import HOST, LogCapture, Peer, Relay
from tests.support.frames import binary_frame
from tests.support.http import request_head, upgrade_headers

PUBLISH_SECRET = b"publish-secret-for-tests"
VIEW_SECRET = b"view-secret-for-tests"


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def token(role: str, stream: str = "cam", ttl: int = 3600, secret: bytes | None = None) -> str:
    if secret is None:
        secret = PUBLISH_SECRET if role == "publish" else VIEW_SECRET
    return make_token(secret, role, stream, int(time.time()) + ttl)


def refused(
    relay: Relay,
    target: str,
    status: int,
    extra: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    closes: bool = True,
) -> Peer:
    """Attempt a WebSocket handshake and check it is refused with ``status``, as a short
    plain-text answer, no WebSocket created and (unless told) the connection closing."""
    peer = relay.connect(host)
    response = peer.upgrade(target, extra)
    assert response.status == status, (response.status, response.body)
    assert (response.header("content-type") or "").startswith("text/plain")
    assert 0 < len(response.body) < 200
    assert peer.protocol is None
    if closes:
        assert peer.closing, "a refused connection is closed"
    return peer


# -- 404, 400, 426 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["/nope", "/publish", "/publish/", "/watch", "/watch/cam/extra", "/publish/a/b",
     "/echo", "/api/", "/api/streams/x", "/api/nothing", "/watch//cam", "/api/internals"],
)
def test_unknown_paths_get_404(target: str) -> None:
    """Paths that name no endpoint are 404, also with WebSocket upgrade headers (and
    /echo is unknown unless --echo, /api/internals unless --api-internals)."""
    relay = Relay()
    refused(relay, target, 404, closes=False)
    peer = relay.connect()
    assert peer.request("GET", target).status == 404


@pytest.mark.parametrize(
    "name", [".hidden", "-x", "a" * 65, "caf%C3%A9", "a%2Fb", "a%20b", "%00", "a%0Ab"]
)
@pytest.mark.parametrize("role", ["publish", "watch"])
def test_bad_stream_names_get_400(role: str, name: str) -> None:
    """A path segment that is not a valid stream name is 400."""
    refused(Relay(), f"/{role}/{name}", 400)


def test_64_character_names_are_accepted() -> None:
    """The longest valid name works end to end."""
    relay = Relay()
    relay.viewer("a" * 64)
    relay.publisher("B" * 64)


@pytest.mark.parametrize("role", ["publish", "watch"])
@pytest.mark.parametrize(
    "query", ["", "?redirect=https://evil.example/", "?redirect=//evil.example&after=0"]
)
def test_plain_get_on_a_websocket_path_is_426_without_redirect(role: str, query: str) -> None:
    """A plain HTTP request on a WebSocket path gets 426 (Upgrade: websocket), never
    Autobahn's status page and never a redirect, whatever the query says."""
    relay = Relay()
    peer = relay.connect()
    response = peer.request("GET", f"/{role}/cam{query}")
    assert response.status == 426
    assert response.header("upgrade") == "websocket"
    assert response.header("location") is None
    assert b"evil" not in peer.written
    assert b"<html" not in peer.written.lower()
    assert relay.context.registry.streams == {}


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD", "DELETE"])
def test_non_get_upgrade_is_426(method: str) -> None:
    """Only GET opens a WebSocket."""
    relay = Relay()
    peer = relay.connect()
    response = peer.request(method, "/watch/cam", upgrade_headers(host=HOST))
    assert response.status == 426


def test_api_folder_itself_is_404() -> None:
    """GET /api is an unknown path like any other: a plain 404."""
    response = Relay().connect().request("GET", "/api")
    assert response.status == 404
    assert (response.header("content-type") or "").startswith("text/plain")


def test_400_comes_before_426() -> None:
    """A bad name on a plain request is 400, not 426."""
    relay = Relay()
    assert relay.connect().request("GET", "/watch/.x").status == 400


# -- 431 and 413 --------------------------------------------------------------------------


def _assert_431(peer: Peer) -> None:
    response = peer.response()
    assert response.status == 431, response
    assert peer.closing
    assert peer.protocol is None


def test_header_line_of_64_kib_with_no_end_is_431() -> None:
    """A 64 KiB header line that never ends is answered 431 and closed; the bytes are
    not buffered further."""
    relay = Relay()
    peer = relay.connect()
    peer.send(b"GET /watch/cam HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(64):
        peer.send(b"a" * 1024)
    _assert_431(peer)
    assert len(peer.channel._buffer) < 16 * 1024


def test_request_line_of_64_kib_is_431() -> None:
    """An endless request line is bounded the same way."""
    relay = Relay()
    peer = relay.connect()
    peer.send(b"GET /" + b"a" * 65536)
    _assert_431(peer)


def test_header_line_over_8_kib_is_431() -> None:
    """One header line over 8 KiB is refused even though the total is under 16 KiB."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    headers["X-Long"] = "b" * (8 * 1024 + 1)
    peer.send(request_head("GET", "/watch/cam", headers))
    _assert_431(peer)


def test_headers_over_16_kib_in_total_are_431() -> None:
    """64 KiB of headers in lines under 8 KiB each: 431."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    for index in range(16):
        headers[f"X-Filler-{index}"] = "c" * 4000
    peer.send(request_head("GET", "/watch/cam", headers))
    _assert_431(peer)


def test_200_header_lines_are_431() -> None:
    """More than 100 header lines: 431."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    for index in range(200):
        headers[f"X-H{index}"] = "1"
    peer.send(request_head("GET", "/watch/cam", headers))
    _assert_431(peer)


def test_exactly_100_header_lines_are_accepted() -> None:
    """100 header lines is the limit, not over it."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    for index in range(100 - len(headers)):
        headers[f"X-H{index}"] = "1"
    assert len(headers) == 100
    assert peer.upgrade("/watch/cam", headers).status == 101


def test_101_header_lines_are_431() -> None:
    """One header line over the limit is refused."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    for index in range(101 - len(headers)):
        headers[f"X-H{index}"] = "1"
    peer.send(request_head("GET", "/watch/cam", headers))
    _assert_431(peer)


def test_431_comes_from_the_channel_even_on_unknown_paths() -> None:
    """The head bound applies before routing (it protects memory)."""
    relay = Relay()
    peer = relay.connect()
    peer.send(b"GET /nope HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n")
    _assert_431(peer)


def test_431_connection_lingers_then_is_aborted() -> None:
    """After a 431 the relay half-closes and reads (so the answer is not destroyed by an
    RST), then aborts after --close-timeout; the slot is given back."""
    relay = Relay()
    peer = relay.connect()
    peer.send(b"GET /" + b"a" * 65536)
    _assert_431(peer)
    peer.send(b"more garbage\r\n" * 100)
    relay.clock.advance(relay.config.close_timeout)
    assert peer.aborted
    peer.lose(aborted=True)
    relay.assert_idle()


@pytest.mark.parametrize(
    "extra",
    [{"Content-Length": "5"}, {"Transfer-Encoding": "chunked"}, {"Content-Length": "100000000"}],
)
@pytest.mark.parametrize("target", ["/watch/cam", "/healthz", "/nope"])
def test_request_bodies_are_413(target: str, extra: dict[str, str]) -> None:
    """No endpoint takes a body: 413 before any byte of it is buffered."""
    relay = Relay()
    peer = relay.connect()
    headers = upgrade_headers(host=HOST)
    headers.update(extra)
    peer.send(request_head("POST", target, headers))
    response = peer.response()
    assert response.status == 413
    assert peer.closing


# Content-Length forms and Transfer-Encoding values, each a list of header values (a
# header given twice is two values).
CONTENT_LENGTHS = [
    [], ["0"], ["00"], ["000"], ["5"], ["05"], ["+5"], ["+0"], ["-1"], ["-0"],
    ["  5  "], ["\t0\t"], ["0 0"], ["5e0"], ["0x5"], [""], ["9" * 40],
    ["0, 0"], ["0", "0"], ["5", "5"], ["0", "5"], ["00", "0"],
]
TRANSFER_ENCODINGS = [
    [], ["identity"], ["chunked"], ["Chunked"], ["gzip"], ["chunked, identity"],
    ["identity, chunked"], ["gzip, chunked"], ["x-unknown"], [""],
    ["chunked", "chunked"], ["identity", "identity"], ["identity", "chunked"],
]
# (method, target, WebSocket upgrade headers or not)
BODY_TARGETS = [
    ("GET", "/healthz", False),
    ("POST", "/healthz", False),
    ("GET", "/nope", False),
    ("GET", "/watch/cam", True),
    ("GET", "/publish/cam", True),
]


def _head(method: str, target: str, upgrade: bool, extra: list[tuple[str, str]]) -> bytes:
    headers = list(upgrade_headers(host=HOST).items()) if upgrade else [("Host", HOST)]
    return request_head(method, target, [*headers, *extra])


def _one_response(peer: Peer) -> tuple[int, bytes]:
    assert peer.written.count(b"HTTP/1.1 ") == 1, peer.written[:300]
    response = peer.response()
    return response.status, response.body


@pytest.mark.parametrize("encodings", TRANSFER_ENCODINGS, ids=repr)
@pytest.mark.parametrize("lengths", CONTENT_LENGTHS, ids=repr)
def test_every_body_framing_gets_one_answer_and_no_traceback(
    lengths: list[str], encodings: list[str], log: LogCapture
) -> None:
    """Every combination of Content-Length forms (leading zeros, duplicates, signs,
    whitespace, huge) and Transfer-Encoding values, in both orders, on plain and
    WebSocket paths, gets exactly one answer and logs no error: the normal answer when
    the request has no body (a Content-Length of zeros), 413 when it announces one by
    well-formed framing (any single Transfer-Encoding, a Content-Length over 0), 400 or
    413 when the framing is malformed; refused connections close and discard the body,
    and nothing is left behind."""
    digits = [value.strip(" \t") for value in lengths]
    zero_length = not encodings and (
        not lengths or (len(lengths) == 1 and digits[0].isdigit() and int(digits[0]) == 0)
    )
    well_formed_body = (not encodings and len(lengths) == 1 and digits[0].isdigit()
                        and int(digits[0]) > 0) or (
        not lengths and len(encodings) == 1
        and encodings[0].lower() in ("chunked", "identity"))
    length_headers = [("Content-Length", value) for value in lengths]
    encoding_headers = [("Transfer-Encoding", value) for value in encodings]
    for method, target, upgrade in BODY_TARGETS:
        baseline = Relay().connect()
        baseline.send(_head(method, target, upgrade, []))
        expected = _one_response(baseline)
        for extra in (length_headers + encoding_headers, encoding_headers + length_headers):
            relay = Relay()
            peer = relay.connect()
            peer.send(_head(method, target, upgrade, extra))
            if not zero_length:
                peer.send(b"5\r\nhello\r\n0\r\n\r\n")  # a body, chunked or not
            where = (method, target, extra)
            assert not log.failures, (where, log.describe_failures())
            status, body = _one_response(peer)
            if zero_length:
                assert status == expected[0], where
                if status != 101:
                    assert body == expected[1], where
            else:
                assert status == 413 if well_formed_body else status in (400, 413), where
                assert peer.closing and peer.protocol is None, where
            relay.clock.advance(relay.config.close_timeout)
            relay.settle()
            relay.disconnect_all()
            relay.assert_idle()
            assert not log.failures, (where, log.describe_failures())


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: +5\r\nX-After: 1\r\n\r\nhello",
        b"GET\r\n\r\n",
    ],
)
def test_malformed_heads_get_one_plain_400_and_a_lingering_close(head: bytes) -> None:
    """twisted.web's bad-request path answers as the relay's refusals do: one plain 400
    with a reason, nothing parsed after it, a half-close, then an abort after
    --close-timeout."""
    relay = Relay()
    peer = relay.connect()
    peer.send(head + b"GET /healthz HTTP/1.1\r\n\r\n")
    status, body = _one_response(peer)
    assert (status, body) == (400, b"malformed request\n")
    assert peer.response().header("connection") == "close"
    assert peer.transport.write_closed and not peer.aborted
    relay.clock.advance(relay.config.close_timeout)
    assert peer.aborted
    peer.lose(aborted=True)
    relay.assert_idle()


# -- 503 ------------------------------------------------------------------------------------


def _assert_503(peer: Peer) -> None:
    response = peer.response()
    assert response.status == 503, response
    retry_after = response.header("retry-after")
    assert retry_after is not None and int(retry_after) >= 1


def test_global_connection_limit_is_503_with_retry_after() -> None:
    """Over --max-connections a handshake gets 503 + Retry-After; plain HTTP requests
    too; the refused connections are not counted."""
    relay = Relay.with_options(max_connections=2)
    relay.viewer()
    relay.connect("10.1.1.1")
    _assert_503(refused(relay, "/watch/cam", 503, host="10.2.2.2"))
    extra = relay.connect("10.3.3.3")
    assert extra.request("GET", "/healthz").status == 503
    assert relay.context.limiter.total == 2
    relay.disconnect_all()
    relay.assert_idle()


def test_per_address_limit_is_503_and_spares_other_addresses() -> None:
    """Over --max-connections-per-ip one address is refused, another is not."""
    relay = Relay.with_options(max_connections_per_ip=2)
    relay.viewer(host="10.0.0.1")
    relay.viewer(host="10.0.0.1")
    _assert_503(refused(relay, "/watch/cam", 503, host="10.0.0.1"))
    relay.viewer(host="10.0.0.2")


def test_handshake_rate_limit_is_503_with_retry_after() -> None:
    """Over the per-address handshake rate (burst then rate) a reload storm gets 503 +
    Retry-After, and is let in again once the bucket refills."""
    relay = Relay.with_options(max_handshakes_per_ip=2.0, handshake_burst=3)
    for _ in range(3):
        relay.viewer(host="10.0.0.1")
    _assert_503(refused(relay, "/watch/cam", 503, host="10.0.0.1"))
    relay.viewer(host="10.0.0.2")
    relay.clock.advance(0.5)
    relay.viewer(host="10.0.0.1")


def test_handshake_rate_limit_does_not_apply_to_plain_http() -> None:
    """/healthz polling is not a handshake."""
    relay = Relay.with_options(max_handshakes_per_ip=1.0, handshake_burst=1)
    for _ in range(10):
        assert relay.connect().request("GET", "/healthz").status == 200


def test_stream_limit_is_503() -> None:
    """Over --max-streams a publisher of a new stream is refused; viewers never count
    towards it, and a takeover is not a new stream."""
    relay = Relay.with_options(max_streams=1)
    relay.viewer("one")
    relay.viewer("two")
    relay.publisher("two")
    _assert_503(refused(relay, "/publish/one", 503))
    _assert_503(refused(relay, "/publish/three", 503))
    relay.viewer("three")
    relay.publisher("two")


def test_waiting_stream_limits_are_503() -> None:
    """Names held only by waiting viewers have their own bounds, in total and per
    address; a publisher is never refused because of them."""
    relay = Relay.with_options(max_waiting_streams=2, max_waiting_streams_per_ip=1)
    relay.viewer("one", host="10.0.0.1")
    _assert_503(refused(relay, "/watch/two", 503, host="10.0.0.1"))
    relay.viewer("one", host="10.0.0.1")
    relay.viewer("two", host="10.0.0.2")
    _assert_503(refused(relay, "/watch/three", 503, host="10.0.0.3"))
    relay.publisher("three")


def test_viewer_limit_is_503() -> None:
    """Over --max-viewers-per-stream a viewer is refused."""
    relay = Relay.with_options(max_viewers_per_stream=2)
    relay.viewer()
    relay.viewer()
    _assert_503(refused(relay, "/watch/cam", 503))
    relay.viewer("other")
    relay.publisher()


def test_shutting_down_is_503_and_healthz_says_so() -> None:
    """While draining, new handshakes get 503 + Retry-After and /healthz answers 503."""
    relay = Relay()
    relay.context.drain()
    _assert_503(refused(relay, "/watch/cam", 503))
    assert relay.connect().request("GET", "/healthz").status == 503


# -- 403 ------------------------------------------------------------------------------------


def test_publish_without_origin_from_loopback_is_allowed() -> None:
    """Desktop publishers send no Origin: accepted from loopback with no secret."""
    Relay().publisher()


@pytest.mark.parametrize(
    "origin", ["https://example.com", "http://localhost:8080", "http://127.0.0.1", "null"]
)
def test_publish_with_any_origin_is_403_by_default(origin: str) -> None:
    """With the default (empty) --publish-origins any Origin header is refused: a web
    page must not publish through the user's browser."""
    refused(Relay(), "/publish/cam", 403, {"Origin": origin})


def test_publish_origin_allowed_when_listed() -> None:
    """A listed publish origin (wildcards as Autobahn) is accepted, others refused."""
    relay = Relay.with_options(publish_origins=("https://*.example.com",))
    relay.publisher("a", extra={"Origin": "https://studio.example.com"})
    refused(relay, "/publish/b", 403, {"Origin": "https://example.org"})
    refused(relay, "/publish/b", 403, {"Origin": "null"})


def test_view_origins_default_allows_any_but_null() -> None:
    """--view-origins defaults to ``*``; ``Origin: null`` matches only a listed null."""
    relay = Relay()
    relay.viewer(extra={"Origin": "https://anywhere.example"})
    relay.viewer()
    refused(relay, "/watch/cam", 403, {"Origin": "null"})


def test_null_origin_allowed_only_when_listed() -> None:
    """``null`` in --view-origins lets sandboxed pages and file:// watch."""
    relay = Relay.with_options(view_origins=("null",))
    relay.viewer(extra={"Origin": "null"})
    refused(relay, "/watch/cam", 403, {"Origin": "https://example.com"})


def test_view_origin_patterns() -> None:
    """Patterns restrict viewing to the listed origins."""
    relay = Relay.with_options(view_origins=("https://*.example.com", "http://localhost:8000"))
    relay.viewer(extra={"Origin": "https://www.example.com"})
    relay.viewer(extra={"Origin": "http://localhost:8000"})
    refused(relay, "/watch/cam", 403, {"Origin": "https://example.com.evil.net"})
    refused(relay, "/watch/cam", 403, {"Origin": "http://localhost:8001"})


@pytest.mark.parametrize("host", ["192.0.2.10", "10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"])
def test_publish_from_non_loopback_without_secret_is_403(host: str) -> None:
    """Without a publish secret only loopback peers may publish."""
    refused(Relay(), "/publish/cam", 403, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_publish_from_loopback_without_secret_is_allowed(host: str) -> None:
    """127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104 count as loopback."""
    Relay().publisher(host=host)


@pytest.mark.parametrize(
    "header", [{"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}]
)
def test_publish_through_a_local_proxy_is_not_loopback(header: dict[str, str]) -> None:
    """A reverse proxy on the same host must not open publishing to the world."""
    refused(Relay(), "/publish/cam", 403, header)


def test_viewing_from_anywhere_is_open_without_view_secret() -> None:
    """Without --view-secret-file any address may watch."""
    Relay().viewer(host="203.0.113.50")


# -- 401 ------------------------------------------------------------------------------------


def test_publish_with_secret_requires_a_token() -> None:
    """With a publish secret, no token is 401 (even from loopback)."""
    refused(Relay.with_options(publish_secret=PUBLISH_SECRET), "/publish/cam", 401)


@pytest.mark.parametrize("where", ["header", "query"])
def test_valid_publish_token_from_anywhere(where: str) -> None:
    """A valid token opens publishing from any address, in the Authorization header or
    in ?token=."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET)
    value = token("publish")
    if where == "header":
        relay.publisher(host="203.0.113.7", extra={"Authorization": f"Bearer {value}"})
    else:
        relay.open(f"/publish/cam?token={value}", host="203.0.113.7")


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "tampered",
        "expired",
        "wrong-role",
        "wrong-stream",
        "other-secret",
    ],
)
def test_bad_publish_tokens_are_401(bad: str, where: str) -> None:
    """Missing, malformed, tampered, expired, wrong-role, wrong-stream or foreign-secret
    tokens are refused with 401, by header and by query."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET, view_secret=VIEW_SECRET)
    value = {
        "garbage": "not-a-token",
        "tampered": token("publish")[:-1] + ("0" if token("publish")[-1] != "0" else "1"),
        "expired": token("publish", ttl=-10),
        "wrong-role": make_token(PUBLISH_SECRET, "view", "cam", int(time.time()) + 60),
        "wrong-stream": token("publish", stream="other"),
        "other-secret": token("publish", secret=b"nope"),
    }[bad]
    if where == "header":
        peer = refused(relay, "/publish/cam", 401, {"Authorization": f"Bearer {value}"})
    else:
        peer = refused(relay, f"/publish/cam?token={value}", 401)
    assert value.encode() not in peer.written


@pytest.mark.parametrize("scheme", ["Basic", "Token", ""])
def test_authorization_other_than_bearer_is_no_token(scheme: str) -> None:
    """Only ``Bearer`` carries a token."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET)
    refused(relay, "/publish/cam", 401, {"Authorization": f"{scheme} {token('publish')}"})


def test_view_secret_requires_viewer_tokens() -> None:
    """With --view-secret-file viewers need a view token; a publish token will not do."""
    relay = Relay.with_options(view_secret=VIEW_SECRET)
    refused(relay, "/watch/cam", 401)
    refused(relay, f"/watch/cam?token={token('publish', secret=VIEW_SECRET)}", 401)
    relay.open(f"/watch/cam?token={token('view')}")
    relay.viewer(extra={"Authorization": f"Bearer {token('view')}"})


def test_unicode_digit_token_is_401_not_500() -> None:
    """A hostile token is a 401 like any other bad token."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET)
    refused(relay, "/publish/cam?token=%C2%B2." + "0" * 64, 401)


# -- 409 ------------------------------------------------------------------------------------


def test_second_publisher_is_409_with_no_takeover() -> None:
    """--no-takeover: a second publisher for a live stream gets 409; the first stays."""
    relay = Relay.with_options(takeover=False)
    first = relay.publisher()
    refused(relay, "/publish/cam", 409)
    assert not first.closing
    first.lose()
    relay.publisher()


# -- the order of the checks ----------------------------------------------------------------


def test_refusal_order() -> None:
    """When several refusals apply, the first in the documented order wins:
    404, 400, 426, 431, 503, 403, 401, 409."""
    relay = Relay.with_options(max_connections=3, publish_secret=PUBLISH_SECRET, takeover=False)
    relay.publisher(extra={"Authorization": f"Bearer {token('publish')}"})

    def check(target: str, status: int, extra: dict[str, str] | None = None) -> Peer:
        peer = refused(relay, target, status, extra)
        peer.lose()
        return peer

    # 409 is last: a good token and no Origin.
    check("/publish/cam", 409, {"Authorization": f"Bearer {token('publish')}"})
    # 401 before 409.
    check("/publish/cam", 401)
    # 403 (origin) before 401 and 409.
    check("/publish/cam", 403, {"Origin": "https://evil.example"})
    # 503 (connection limit) before 403.
    relay.connect()
    relay.connect()
    _assert_503(check("/publish/cam", 503, {"Origin": "https://evil.example"}))
    # 431 before 503.
    peer = relay.connect()
    peer.send(b"GET /publish/cam HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n")
    assert peer.response().status == 431
    peer.lose()
    # 426 before 503, 400 before 426, 404 before 400 (on the WebSocket paths).
    for target, status in [
        ("/publish/cam", 426), ("/publish/.bad", 400), ("/publish/.bad/x", 404)
    ]:
        peer = relay.connect()
        assert peer.request("GET", target).status == status
        peer.lose()


def test_404_comes_before_503_on_any_path() -> None:
    """404 is the first check: an unknown path is 404 even on a connection over the
    limits."""
    relay = Relay.with_options(max_connections=1)
    relay.connect()
    assert relay.connect().request("GET", "/nope", upgrade_headers(host=HOST)).status == 404


def test_shutting_down_503_comes_before_origin_and_token() -> None:
    """While draining every handshake is 503, whatever else is wrong with it."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET)
    relay.context.drain()
    refused(relay, "/publish/cam", 503, {"Origin": "https://evil.example"})


def _documented_refusal_order() -> list[int]:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = text.split("## Refusals", 1)[1].split("\n## ", 1)[0]
    return [int(status) for status in re.findall(r"^\| (\d{3})\b", section, re.MULTILINE)]


def test_admission_checks_follow_the_documented_refusal_table() -> None:
    """The gate's checks run in the order of docs/protocol.md's refusal table (431 and
    413 are the channel's, decided while the head is read); each check's docstring
    starts with its status."""
    in_code: list[int] = []
    for check in CHECKS:
        status = int((check.__doc__ or "").split(":", 1)[0])
        if status not in in_code:
            in_code.append(status)
    documented = [status for status in _documented_refusal_order() if status not in (431, 413)]
    assert documented == [404, 400, 426, 503, 403, 401, 409]
    assert in_code == documented


def test_refused_handshakes_leave_nothing_behind() -> None:
    """A storm of refused handshakes leaves the registry, limits and timers idle."""
    relay = Relay.with_options(max_waiting_streams=1, publish_secret=PUBLISH_SECRET)
    relay.viewer("one")
    for target, status, extra in [
        ("/watch/two", 503, None),
        ("/publish/one", 401, None),
        ("/publish/one", 403, {"Origin": "https://x"}),
        ("/watch/.x", 400, None),
        ("/zzz", 404, None),
    ]:
        for _ in range(5):
            refused(relay, target, status, extra, closes=status != 404)
    relay.clock.advance(relay.config.close_timeout)
    relay.settle()
    relay.disconnect_all()
    relay.assert_idle()


# -- plain endpoints ------------------------------------------------------------------------


def test_healthz() -> None:
    """GET /healthz answers 200 ``ok``."""
    response = Relay().connect().request("GET", "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")


def test_api_streams_idle_state() -> None:
    """With nothing connected but the requester, /api/streams lists no stream and
    counts only the requesting connection."""
    response = Relay().connect().request("GET", "/api/streams")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert json.loads(response.body) == {
        "streams": [],
        "connections": {"publishers": 0, "viewers": 0, "total": 1},
    }


def test_api_streams_lists_live_streams() -> None:
    """A live stream with viewers is listed with its counters; the publisher's address
    only for loopback requesters; counts include handshakes in progress."""
    relay = Relay()
    publisher = relay.publisher("cam")
    relay.viewer("cam")
    relay.viewer("waiting")
    relay.connect("10.9.9.9").send(b"GET /watch/cam HTTP/1.1\r\n")  # handshake in progress
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"x" * 91)))
    body = json.loads(relay.connect().request("GET", "/api/streams").body)
    assert body["connections"] == {"publishers": 1, "viewers": 2, "total": 5}
    cam, waiting = body["streams"]
    assert cam["name"] == "cam" and cam["live"] is True and cam["viewers"] == 1
    assert cam["messages_in"] == 1 and cam["bytes_in"] == 100 and cam["keyframes"] == 1
    assert cam["publisher"]["peer"] == f"127.0.0.1:{publisher.address.port}"
    assert cam["publisher"]["since"].endswith("Z")
    assert waiting == {**waiting, "name": "waiting", "live": False, "publisher": None}
    remote = json.loads(relay.connect("203.0.113.1").request("GET", "/api/streams").body)
    assert remote["streams"][0]["publisher"]["peer"] is None
    proxied = relay.connect().request("GET", "/api/streams", {"X-Forwarded-For": "1.2.3.4"})
    assert json.loads(proxied.body)["streams"][0]["publisher"]["peer"] is None


def test_api_streams_is_loopback_only_with_a_view_secret() -> None:
    """With --view-secret-file the stream list is private: 403 for other requesters."""
    relay = Relay.with_options(view_secret=VIEW_SECRET)
    assert relay.connect("203.0.113.1").request("GET", "/api/streams").status == 403
    assert (
        relay.connect().request("GET", "/api/streams", {"X-Forwarded-For": "1.2.3.4"}).status
        == 403
    )
    assert relay.connect().request("GET", "/api/streams").status == 200


def test_api_internals_counts_live_objects_for_direct_loopback_only() -> None:
    """With --api-internals, /api/internals reports live channels and protocols, open
    connections and the limits' counters to direct loopback requesters; 403 for others
    and for requests forwarded by a proxy."""
    relay = Relay.with_options(api_internals=True)
    relay.viewer()
    response = relay.connect().request("GET", "/api/internals")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    body = json.loads(response.body)
    assert body["objects"] == {"RelayChannel": 2, "ViewerProtocol": 1}
    assert body["connections"] == 2 and body["streams"] == 1
    assert body["limiter"] == {"total": 2, "addresses": 1, "refused": 0}
    assert relay.connect("203.0.113.1").request("GET", "/api/internals").status == 403
    forwarded = relay.connect().request("GET", "/api/internals", {"X-Forwarded-For": "1.2.3.4"})
    assert forwarded.status == 403


def test_plain_endpoints_refuse_other_methods() -> None:
    """GET and HEAD only."""
    relay = Relay()
    response = relay.connect().request("DELETE", "/healthz")
    assert response.status == 405
    assert "GET" in (response.header("allow") or "")


def test_index_and_player_pages_are_served_with_a_strict_csp() -> None:
    """/ and /view/{stream} serve the packaged pages with CSP, nosniff and
    no-referrer (the player's URL may carry ?token=)."""
    relay = Relay()
    index = relay.connect().request("GET", "/")
    assert index.status == 200 and index.body == b"<html>index</html>"
    player = relay.connect().request("GET", "/view/cam?token=abc")
    assert player.status == 200 and player.body == b"<p>"
    for response in (index, player):
        assert "default-src 'none'" in (response.header("content-security-policy") or "")
        assert response.header("x-content-type-options") == "nosniff"
        assert response.header("referrer-policy") == "no-referrer"
    assert relay.connect().request("GET", "/view/.bad").status == 400
    assert relay.connect().request("GET", "/view/a/b").status == 404
    assert relay.connect().request("GET", "/static/nothing.js").status == 404


# -- keep-alive and the handshake deadline --------------------------------------------------


def test_handshake_deadline_counts_from_accept_however_slow_the_bytes() -> None:
    """Slowloris: a request head trickling in a byte at a time is aborted at
    --handshake-timeout after the TCP accept, and its slot is given back."""
    relay = Relay.with_options(handshake_timeout=5.0)
    peer = relay.connect()
    head = request_head("GET", "/watch/cam", upgrade_headers(host=HOST))
    for index in range(49):
        peer.send(head[index : index + 1])
        relay.clock.advance(0.1)
    assert not peer.aborted
    relay.clock.advance(0.11)
    assert peer.aborted
    peer.lose(aborted=True)
    relay.assert_idle()


def test_idle_connection_without_any_byte_is_aborted() -> None:
    """A connection that never sends anything is aborted at the handshake timeout."""
    relay = Relay.with_options(handshake_timeout=2.0)
    peer = relay.connect()
    relay.clock.advance(1.99)
    assert not peer.aborted
    relay.clock.advance(0.02)
    assert peer.aborted


def test_a_completed_head_stops_the_deadline() -> None:
    """An upgraded connection is not aborted by the handshake deadline."""
    relay = Relay.with_options(handshake_timeout=2.0, ping_interval=100, ping_timeout=100)
    peer = relay.viewer()
    relay.clock.advance(50)
    assert not peer.closing


def test_keep_alive_requests_then_an_upgrade() -> None:
    """Plain requests may share a connection with a later WebSocket handshake."""
    relay = Relay()
    peer = relay.connect()
    peer.send(request_head("GET", "/healthz", {"Host": HOST}))
    first, rest = peer.written.split(b"ok\n", 1)
    assert first.startswith(b"HTTP/1.1 200")
    assert rest == b""
    peer.transport.clear()
    response = peer.upgrade("/watch/cam")
    assert response.status == 101


# -- access log ---------------------------------------------------------------------------


class _KeptOpen(io.StringIO):
    def close(self) -> None:
        pass


def test_access_log_never_contains_tokens(log: LogCapture) -> None:
    """Neither the request's query string nor the Referer's reaches the access log or
    any log event, for accepted and refused requests alike."""
    relay = Relay.with_options(publish_secret=PUBLISH_SECRET, view_secret=VIEW_SECRET)
    buffer = _KeptOpen()
    relay.site.startFactory()
    relay.site.logFile = buffer
    try:
        good = token("view")
        bad = "1." + "f" * 64
        relay.connect().request(
            "GET", f"/view/cam?token={good}", {"Referer": f"http://x/?token={good}"}
        )
        refused(
            relay, f"/watch/cam?token={bad}", 401, {"Referer": f"http://x/view/cam?token={bad}"}
        )
        relay.open(f"/watch/cam?token={good}")
        relay.publisher(extra={"Authorization": f"Bearer {token('publish')}"})
        peer = relay.connect()
        peer.request("GET", f"/healthz?token={good}")
    finally:
        relay.site.stopFactory()
    access = buffer.getvalue()
    assert "/view/cam" in access and "/watch/cam" in access and "/healthz" in access
    everything = access + "\n".join(repr(event) for event in log.events)
    for secret in (good, bad, good.split(".")[1], token("publish").split(".")[1],
                   PUBLISH_SECRET.decode(), VIEW_SECRET.decode()):
        assert secret not in everything


# -- graceful stop -------------------------------------------------------------------------


def test_drain_with_no_connection_fires_at_once() -> None:
    """Stopping an idle relay is immediate and leaves no timer behind."""
    relay = Relay()
    fired: list[object] = []
    relay.context.drain().addCallback(fired.append)
    assert fired == [None]
    relay.assert_idle()


def test_drain_fires_when_the_last_connection_is_lost() -> None:
    """The graceful stop completes the moment the last connection is lost, with no
    clock tick (no polling), and leaves no timer behind."""
    relay = Relay()
    viewer = relay.viewer()
    idle_http = relay.connect()
    fired: list[object] = []
    relay.context.drain().addCallback(fired.append)
    idle_http.lose()
    assert fired == []
    viewer.lose()
    assert fired == [None]
    relay.assert_idle()


def test_relay_service_stop_drains_before_it_stops() -> None:
    """twistd's stop (SIGTERM) closes every WebSocket with 1001 and completes once they
    are gone; meanwhile new handshakes get 503."""
    from streamrelay.tap import RelayService

    relay = Relay()
    relay_service = RelayService(relay.context)
    relay_service.startService()
    viewer = relay.viewer()
    stopped: list[object] = []
    relay_service.stopService().addCallback(stopped.append)
    assert viewer.close_codes() == [1001]
    refused(relay, "/watch/cam", 503)
    assert stopped == []
    viewer.send(b"\x88\x82\x00\x00\x00\x00\x03\xe9")  # close 1001, zero mask
    relay.settle()
    relay.tick(relay.config.close_timeout + 1)
    relay.settle()
    assert stopped and not relay_service.running


def test_autobahn_never_sees_the_token() -> None:
    """The token, checked in the HTTP handshake, is not replayed to Autobahn (which logs
    requests at debug level): neither the Authorization header nor ``?token=``."""
    relay = Relay.with_options(view_secret=VIEW_SECRET)
    header_token, query_token = token("view"), token("view", ttl=7200)
    relay.viewer(extra={"Authorization": f"Bearer {header_token}"})
    relay.open(f"/watch/cam?token={query_token}")
    protocols: list[Any] = list(relay.context.registry.streams["cam"].viewers)
    assert len(protocols) == 2
    for protocol in protocols:
        # The handshake's leftovers may be released after the upgrade (None): what is
        # still held must not carry the token.
        seen = repr(protocol.http_request_data) + repr(protocol.http_headers)
        seen += repr(protocol.http_request_uri)
        assert header_token not in seen and query_token not in seen
        assert "authorization" not in (protocol.http_headers or {})
