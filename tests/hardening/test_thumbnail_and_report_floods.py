"""Thumbnails and viewer reports under abuse, over real sockets to the real relay: a
publisher flooding 40 KiB thumbnails keeps its connection (at most one a second is kept,
the rest ignored undecoded) and the relay stays responsive; a viewer flooding clock
requests gets at most the documented burst of answers before its inbound budget closes
it (1008); a bad thumbnail closes its publisher with 1007."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.support.frames import OP_BINARY, OP_CLOSE, OP_TEXT, FrameParser, client_frame
from tests.support.http import http_get, http_json
from tests.support.raw_ws import wait_for_close, ws_open
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(90)]


def thumbnail_frame(index: int, size: int = 40 * 1024) -> bytes:
    """A publisher's ``thumbnail`` text message of a ``size``-byte "JPEG" (only its SOI
    marker is checked, which is the point: the relay never decodes it)."""
    jpeg = b"\xff\xd8\xff\xe0" + index.to_bytes(4, "big") + bytes(size - 8)
    body = json.dumps({"type": "thumbnail", "jpeg": base64.b64encode(jpeg).decode()})
    return client_frame(OP_TEXT, body.encode())


def test_a_thumbnail_flood_keeps_one_a_second_and_the_relay_answers(
    start_relay: StartRelay,
) -> None:
    """300 thumbnails of 40 KiB as fast as the socket takes them (12 MB): the publisher
    stays connected, the kept thumbnail is one of them and /healthz answers throughout."""
    relay = start_relay()
    publisher, response = ws_open(relay.port, "/publish/flood")
    assert response.status == 101
    key = b"\x01" + (1).to_bytes(8, "big") + b"\x00\x00\x00\x01\x65"
    publisher.sendall(client_frame(OP_BINARY, key))
    started = time.monotonic()
    for index in range(300):
        publisher.sendall(thumbnail_frame(index))
        if index % 100 == 0:
            assert http_get(relay.http_url, "/healthz").status == 200
    sent_in = time.monotonic() - started
    kept = http_get(relay.http_url, "/api/streams/flood/thumbnail.jpg")
    assert kept.status == 200 and len(kept.body) == 40 * 1024
    entry = http_json(relay.http_url, "/api/streams")["streams"][0]
    assert entry["live"] and entry["thumbnail"]["bytes"] == 40 * 1024
    # Still connected: a bad one is answered with 1007 (once past the second in which
    # another was kept, bad ones are ignored undecoded too: it is sent every 0.5 s).
    bad = client_frame(OP_TEXT, b'{"type":"thumbnail","jpeg":"R0lGODlh"}')
    parser = FrameParser()
    for _ in range(20):
        publisher.sendall(bad)
        outcome = wait_for_close(publisher, 0.5, parser=parser, reply=True)
        if outcome.code is not None:
            break
    publisher.close()
    assert outcome.code == 1007, outcome
    print(f"300 thumbnails of 40 KiB taken in {sent_in:.2f} s")


def test_a_clock_request_flood_gets_the_burst_then_the_budget_closes_it(
    start_relay: StartRelay,
) -> None:
    """A viewer sending 200 time requests at once: at most 4 answers (the burst; the
    rate adds one per 5 s), then 1008 for going over the inbound budget."""
    relay = start_relay()
    viewer, response = ws_open(relay.port, "/watch/clock")
    assert response.status == 101
    request = client_frame(OP_TEXT, b'{"type":"time","t0":1}')
    try:
        viewer.sendall(request * 200)
    except (BrokenPipeError, ConnectionResetError):
        pass
    parser = FrameParser()
    frames = parser.feed(response.rest)
    viewer.settimeout(10)
    while not any(frame.opcode == OP_CLOSE for frame in frames):
        chunk = viewer.recv(1 << 16)
        if not chunk:
            break
        frames += parser.feed(chunk)
    viewer.close()
    closes = [frame.close_code for frame in frames if frame.opcode == OP_CLOSE]
    assert closes == [1008], frames
    answers = [
        frame for frame in frames
        if frame.opcode == OP_TEXT and json.loads(frame.payload).get("type") == "time"
    ]
    assert 1 <= len(answers) <= 4, answers
