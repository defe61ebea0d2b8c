"""A publisher flooding ``publisher-state`` flips, over real sockets to the real relay:
every flip that took effect would shed the GOP and send every viewer a status, so one
small inbound message would fan out to N writes.  The relay applies a publisher's flips
at most once a second (docs/protocol.md "Publishing on demand"): 3,000 flips, within the
publisher's inbound budget, cost each viewer a handful of statuses; the publisher stays
connected and the stream ends in its last word."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest

from tests.support.frames import OP_BINARY, OP_CLOSE, OP_TEXT, Frame, FrameParser, client_frame
from tests.support.http import http_json
from tests.support.raw_ws import ws_open
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(90)]

CONFIG = b"\x02" + (1).to_bytes(8, "big") + b"\x00\x00\x00\x01\x67\x42"
KEY = b"\x01" + (2).to_bytes(8, "big") + b"\x00\x00\x00\x01\x65"


def flip(state: str) -> bytes:
    """A publisher's ``publisher-state`` text message."""
    return client_frame(OP_TEXT, json.dumps({"type": "publisher-state", "state": state}).encode())


def read_for(sock: socket.socket, parser: FrameParser, seconds: float) -> list[Frame]:
    """Every frame that arrives on ``sock`` within ``seconds``."""
    frames: list[Frame] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        frames += parser.feed(chunk)
    return frames


def test_a_flood_of_state_flips_costs_each_viewer_a_bounded_number_of_statuses(
    start_relay: StartRelay,
) -> None:
    """3,000 alternating flips in three bursts half a second apart, the last ``idle``:
    two viewers each get at most one status per second of the flood (plus the first and
    the last word), the last one idle; the publisher is still connected; the stream is
    available."""
    relay = start_relay()
    publisher, response = ws_open(relay.port, "/publish/flips")
    assert response.status == 101
    publisher.sendall(client_frame(OP_BINARY, CONFIG) + client_frame(OP_BINARY, KEY))
    viewers = []
    for _ in range(2):
        viewer, answer = ws_open(relay.port, "/watch/flips")
        assert answer.status == 101
        parser = FrameParser()
        parser.feed(answer.rest)
        read_for(viewer, parser, 0.5)  # status, CONFIG, KEY
        viewers.append((viewer, parser))

    started = time.monotonic()
    flips = 0
    for _ in range(3):
        burst = []
        for _ in range(1000):
            flips += 1
            burst.append(flip("idle" if flips % 2 else "active"))
        publisher.sendall(b"".join(burst))
        time.sleep(0.5)
    publisher.sendall(flip("idle"))
    received = [read_for(viewer, parser, 2.5) for viewer, parser in viewers]
    elapsed = time.monotonic() - started

    bound = math.ceil(elapsed) + 2
    for frames in received:
        statuses = [
            json.loads(frame.payload) for frame in frames
            if frame.opcode == OP_TEXT and json.loads(frame.payload).get("type") == "status"
        ]  # fmt: skip
        assert 1 <= len(statuses) <= bound, (len(statuses), bound)
        assert statuses[-1] == {"type": "status", "state": "live", "publisher": "idle"}
    publisher.settimeout(0.2)
    try:
        chunk = publisher.recv(1 << 16)
        assert chunk, "the relay closed the publisher's connection"
        closed = [f for f in FrameParser().feed(chunk) if f.opcode == OP_CLOSE]
    except TimeoutError:
        closed = []
    assert closed == []
    [entry] = [s for s in http_json(relay.http_url, "/api/streams")["streams"]]
    assert entry["name"] == "flips" and entry["state"] == "available"
    publisher.close()
    for viewer, _parser in viewers:
        viewer.close()
