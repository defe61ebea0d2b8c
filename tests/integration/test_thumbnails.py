"""Thumbnails end to end: the real publisher process (``python -m streamrelay.publisher``)
sends JPEGs of its test pattern to the real ``twistd streamrelay``, which serves them at
``/api/streams/NAME/thumbnail.jpg``; PyAV decodes what comes back.  The caching (304),
the 404 and the view-token rules are checked over real sockets."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from tests.support.http import http_get
from tests.support.publisher_process import PublisherProcesses, light_encode
from tests.support.relay_api import current_entry
from tests.support.relay_process import StartRelay
from tests.support.tokens import make_token, write_secret
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.publisher_process, pytest.mark.timeout(120)]

SECRET = b"view-secret-of-the-thumbnail-test"


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Any]:
    """``publisher(url, *extra)``: the real publisher process, stopped at teardown."""
    with PublisherProcesses(tmp_path) as publishers:
        yield lambda url, *extra: publishers.start(
            url, "--quiet", *light_encode("640x360", 15, "500k"), *extra
        )


def decode_jpeg(jpeg: bytes) -> av.VideoFrame:
    """Decode with FFmpeg's MJPEG decoder through PyAV (the relay never did)."""
    decoder: Any = av.CodecContext.create("mjpeg", "r")
    frames = decoder.decode(av.Packet(jpeg))
    assert len(frames) == 1
    return frames[0]


def test_the_publishers_thumbnail_is_served_decodable_and_cacheable(
    start_relay: StartRelay, publisher: Any
) -> None:
    """404 before any publisher; within seconds of publishing a JPEG of 320x180 that
    PyAV decodes; 304 for its ETag; a new one replaces it after the interval (a new
    ETag); 404 again once the publisher is gone."""
    relay = start_relay()
    path = "/api/streams/thumbs/thumbnail.jpg"
    assert http_get(relay.http_url, path).status == 404
    process = publisher(f"{relay.ws_url}/publish/thumbs", "--thumbnail-interval", "1")

    def served() -> Any:
        response = http_get(relay.http_url, path)
        return response if response.status == 200 else None

    first = wait_until(served, 30, 0.2)
    assert first.header("content-type") == "image/jpeg"
    frame = decode_jpeg(first.body)
    assert (frame.width, frame.height) == (320, 180)
    etag = first.header("etag")
    assert etag and "no-cache" in (first.header("cache-control") or "")
    print(f"thumbnail: {len(first.body)} bytes, {frame.width}x{frame.height}")
    entry = current_entry(relay, "thumbs")
    assert entry is not None and entry["thumbnail"]["bytes"] > 0
    # The same ETag is answered 304 (unless a new thumbnail just replaced it).
    revalidated = http_get(relay.http_url, path, {"If-None-Match": etag})
    assert revalidated.status in (304, 200)
    if revalidated.status == 304:
        assert revalidated.body == b""
    else:
        assert revalidated.header("etag") != etag

    def replaced() -> bool:
        return http_get(relay.http_url, path, {"If-None-Match": etag}).status == 200

    wait_until(replaced, 15, 0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    wait_until(lambda: http_get(relay.http_url, path).status == 404, 15, 0.2)


def test_thumbnails_need_a_view_token_when_viewing_does(
    start_relay: StartRelay, publisher: Any, tmp_path: Path
) -> None:
    """With --view-secret-file: 401 without a token, 200 with a view token for the
    stream (query or Bearer), 401 with a token for another stream."""
    secret_file = write_secret(tmp_path, "view.secret", SECRET)
    relay = start_relay("--view-secret-file", str(secret_file))
    publisher(f"{relay.ws_url}/publish/guarded", "--thumbnail-interval", "1")
    path = "/api/streams/guarded/thumbnail.jpg"
    token = make_token(SECRET, "view", "guarded", int(time.time()) + 300)

    def served() -> Any:
        response = http_get(relay.http_url, f"{path}?token={token}")
        return response if response.status == 200 else None

    decode_jpeg(wait_until(served, 30, 0.2).body)
    assert http_get(relay.http_url, path).status == 401
    other = make_token(SECRET, "view", "elsewhere", int(time.time()) + 300)
    assert http_get(relay.http_url, f"{path}?token={other}").status == 401
    bearer = http_get(relay.http_url, path, {"Authorization": f"Bearer {token}"})
    assert bearer.status == 200 and bearer.body.startswith(b"\xff\xd8\xff")
