"""Thumbnails (docs/protocol.md, "Thumbnails"): the relay's checks, rate limit and size
cap on a Clock, and the publisher -> relay -> ``GET thumbnail.jpg`` path through the real
Site and Autobahn protocols on StringTransports."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from twisted.internet.task import Clock

from streamrelay import admission, wire
from streamrelay.thumbnails import (
    MIN_INTERVAL_SECONDS,
    ThumbnailSlot,
    ThumbnailTooBig,
    decode_thumbnail,
)
from streamrelay.wire import FLAG_KEY, WireError, encode_media
from tests.fakes import HOST, Relay
from tests.support.frames import binary_frame, text_frame
from tests.support.http import request_head, upgrade_headers
from tests.support.tokens import make_token
from tests.test_auth_url import FakePost

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"
SECRET = b"view-secret-for-thumbnail-tests"
PATH = "/api/streams/cam/thumbnail.jpg"


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def message(jpeg: bytes = JPEG) -> dict[str, Any]:
    """A ``thumbnail`` message as the publisher sends it."""
    return wire.thumbnail_message(jpeg)


# -- the core -----------------------------------------------------------------------------


def test_a_valid_thumbnail_decodes_to_its_jpeg() -> None:
    """Standard padded base64 of a JPEG comes back byte for byte."""
    assert decode_thumbnail(message()) == JPEG


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "thumbnail"},
        {"type": "thumbnail", "jpeg": 12},
        {"type": "thumbnail", "jpeg": "not base64 !"},
        {"type": "thumbnail", "jpeg": base64.b64encode(JPEG).decode()[:-1]},
        {"type": "thumbnail", "jpeg": base64.b64encode(b"\x89PNG\r\n\x1a\n....").decode()},
        {"type": "thumbnail", "jpeg": "é" * 8},
        {"type": "thumbnail", "jpeg": ""},
    ],
)
def test_what_is_not_base64_of_a_jpeg_is_a_wire_error(bad: dict[str, Any]) -> None:
    """Missing, not a string, bad base64 (no padding, stray characters), not a JPEG:
    WireError (1007), never the 1009 kind."""
    with pytest.raises(WireError) as raised:
        decode_thumbnail(bad)
    assert not isinstance(raised.value, ThumbnailTooBig)


def test_a_jpeg_over_the_cap_is_too_big_and_one_at_the_cap_is_fine() -> None:
    """46 KiB is accepted; a byte more raises ThumbnailTooBig (1009)."""
    at_cap = JPEG[:4] + bytes(wire.MAX_THUMBNAIL_BYTES - 4)
    assert decode_thumbnail(message(at_cap)) == at_cap
    with pytest.raises(ThumbnailTooBig):
        decode_thumbnail(message(at_cap + b"\x00"))
    # Even base64 that is far too long is refused before it is decoded.
    with pytest.raises(ThumbnailTooBig):
        decode_thumbnail({"jpeg": "A" * 100_000})


def test_the_slot_keeps_one_a_second_and_counts_its_bytes() -> None:
    """A second thumbnail within the interval is ignored (even an invalid one: it is not
    decoded); after it the newest replaces the old, and the budget sees the difference;
    clear gives every byte back."""
    clock = Clock()
    charged: list[int] = []
    slot = ThumbnailSlot(clock, charged.append)
    assert slot.offer(message())
    assert slot.current is not None and slot.current.jpeg == JPEG
    first_etag = slot.current.etag
    clock.advance(MIN_INTERVAL_SECONDS / 2)
    assert not slot.offer({"jpeg": "garbage"})
    assert slot.ignored == 1
    clock.advance(MIN_INTERVAL_SECONDS / 2)
    smaller = JPEG[:100]
    assert slot.offer(message(smaller))
    assert slot.current.jpeg == smaller and slot.current.etag != first_etag
    assert charged == [len(JPEG), len(smaller) - len(JPEG)]
    slot.clear()
    assert slot.current is None and sum(charged) == 0
    # After a clear (a new publisher) the next one is taken at once.
    assert slot.offer(message())


def test_an_invalid_thumbnail_does_not_replace_the_current_one() -> None:
    """A WireError leaves the kept thumbnail and the rate history as they were."""
    clock = Clock()
    slot = ThumbnailSlot(clock, lambda delta: None)
    slot.offer(message())
    clock.advance(2)
    with pytest.raises(WireError):
        slot.offer({"jpeg": "!!!!"})
    assert slot.current is not None and slot.current.jpeg == JPEG


# -- through the relay ----------------------------------------------------------------------


def live_publisher(relay: Relay, name: str = "cam") -> Any:
    """A publisher of ``name`` that has sent a KEY."""
    publisher = relay.publisher(name)
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    return publisher


def get(relay: Relay, target: str, headers: dict[str, str] | None = None) -> Any:
    """One HTTP GET on a fresh connection."""
    return relay.connect().request("GET", target, {"Host": "relay.test", **(headers or {})})


def test_publisher_thumbnail_is_served_with_caching_headers_and_304() -> None:
    """The JPEG comes back as image/jpeg with ETag, Last-Modified and no-cache; the same
    ETag in If-None-Match gets 304 without a body; /api/streams names the ETag."""
    relay = Relay()
    publisher = live_publisher(relay)
    assert get(relay, PATH).status == 404
    publisher.send(text_frame(message()))
    response = get(relay, PATH)
    assert response.status == 200
    assert response.body == JPEG
    assert response.header("content-type") == "image/jpeg"
    etag = response.header("etag")
    assert etag and etag.startswith('"')
    assert (response.header("last-modified") or "").endswith("GMT")
    assert "no-cache" in (response.header("cache-control") or "")
    again = get(relay, PATH, {"If-None-Match": f'W/"other", {etag}'})
    assert again.status == 304 and again.body == b""
    assert get(relay, PATH, {"If-None-Match": '"other"'}).status == 200
    listing = get(relay, "/api/streams").json()
    assert listing["streams"][0]["thumbnail"] == {"etag": etag, "bytes": len(JPEG)}
    head = relay.connect().request("HEAD", PATH, {"Host": "relay.test"})
    assert head.status == 200 and head.header("content-length") == str(len(JPEG))
    assert not publisher.closing


def test_thumbnails_never_reach_viewers_and_go_with_their_publisher() -> None:
    """Viewers get status and media only; when the publisher leaves, 404."""
    relay = Relay()
    publisher = live_publisher(relay)
    viewer = relay.viewer()
    viewer.messages()
    publisher.send(text_frame(message()))
    assert viewer.json_messages() == []
    assert get(relay, PATH).status == 200
    publisher.lose()
    assert get(relay, PATH).status == 404
    assert relay.context.registry.budget.total >= 0


def test_bad_thumbnails_close_the_publisher_with_1007_and_big_ones_with_1009() -> None:
    """Not a JPEG: 1007; a JPEG over 46 KiB (text still under 64 KiB): 1009."""
    relay = Relay()
    publisher = live_publisher(relay)
    publisher.send(text_frame(message(b"GIF89a" + bytes(100))))
    assert publisher.close_codes() == [1007]
    relay2 = Relay()
    publisher2 = live_publisher(relay2)
    big = message(JPEG[:4] + bytes(wire.MAX_THUMBNAIL_BYTES))
    assert len(json.dumps(big)) < wire.MAX_META_BYTES
    publisher2.send(text_frame(big))
    assert publisher2.close_codes() == [1009]


def test_a_flood_of_thumbnails_keeps_the_first_of_each_second() -> None:
    """Ten in a burst: the first is kept, the rest ignored, the connection stays."""
    relay = Relay()
    publisher = live_publisher(relay)
    for index in range(10):
        publisher.send(text_frame(message(JPEG + bytes([index]))))
    assert get(relay, PATH).body == JPEG + b"\x00"
    relay.clock.advance(MIN_INTERVAL_SECONDS)
    publisher.send(text_frame(message(JPEG + b"\x09")))
    assert get(relay, PATH).body == JPEG + b"\x09"
    assert not publisher.closing


def test_with_a_view_secret_a_view_token_is_needed_even_from_loopback() -> None:
    """401 without a token or with one for another stream or role; 200 with a view token
    in ?token= or Authorization: Bearer; an invalid name is 400, an unknown path 404."""
    relay = Relay.with_options(view_secret=SECRET)
    publisher = live_publisher(relay)
    publisher.send(text_frame(message()))
    expires = int(time.time()) + 60
    assert get(relay, PATH).status == 401
    assert get(relay, PATH + "?token=" + make_token(SECRET, "view", "other", expires)).status == 401
    publish_token = make_token(SECRET, "publish", "cam", expires)
    assert get(relay, PATH + "?token=" + publish_token).status == 401
    good = make_token(SECRET, "view", "cam", expires)
    assert get(relay, PATH + "?token=" + good).body == JPEG
    assert get(relay, PATH, {"Authorization": f"Bearer {good}"}).status == 200
    # A token for a stream without a thumbnail: 404 only once admitted.
    assert get(relay, "/api/streams/nope/thumbnail.jpg").status == 401
    assert get(relay, "/api/streams/%2E%2E/thumbnail.jpg").status == 400
    assert get(relay, "/api/streams/cam/other.jpg").status == 404


def test_auth_url_decides_for_thumbnails_as_for_watching(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --auth-url the endpoint is asked with role view; its 403 is the answer, its
    200 admits; the request waits for it."""
    post = FakePost()
    monkeypatch.setattr(admission, "treq_post", lambda _reactor: post)
    relay = Relay.with_options(auth_url="http://auth.test/check")
    publisher = relay.connect()
    handshake = upgrade_headers("streamrelay.v1", host=HOST)
    publisher.send(request_head("GET", "/publish/cam", handshake))
    post.answer(200)
    assert publisher.response().status == 101
    publisher.send(text_frame(message()))
    peer = relay.connect()
    peer.send(request_head("GET", PATH + "?token=abc", {"Host": "relay.test"}))
    assert peer.written == b""
    assert post.calls[-1][1]["role"] == "view" and post.calls[-1][1]["stream"] == "cam"
    post.answer(403)
    assert peer.response().status == 403
    peer2 = relay.connect()
    peer2.send(request_head("GET", PATH + "?token=def", {"Host": "relay.test"}))
    post.answer(200)
    assert peer2.response().body == JPEG


# -- relay to relay ---------------------------------------------------------------------------


def test_edges_pulling_a_stream_serve_its_thumbnail_and_viewers_never_see_it() -> None:
    """The origin passes its thumbnail to an edge when the edge attaches and whenever a
    new one comes; the edge serves it at its own thumbnail.jpg; no viewer, at the origin
    or the edge, ever gets a thumbnail message."""
    from tests.support.relay_links import Network
    from tests.test_upstream import ORIGIN, seen

    net = Network()
    origin = net.relay(ORIGIN)
    publisher = origin.publisher("cam")
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    publisher.send(text_frame(message()))
    net.flush()
    edge, _manager = net.edge("edge:8080", ORIGIN)
    viewer = edge.viewer("cam")
    net.flush()
    assert "thumbnail" not in seen(viewer)
    assert get(edge, PATH).body == JPEG
    net.tick(MIN_INTERVAL_SECONDS)
    publisher.send(text_frame(message(JPEG + b"\x01")))
    net.flush()
    assert get(edge, PATH).body == JPEG + b"\x01"
    assert get(origin, PATH).body == JPEG + b"\x01"
    assert "thumbnail" not in seen(viewer)
