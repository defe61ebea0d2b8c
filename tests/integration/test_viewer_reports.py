"""Viewer reports end to end over real sockets: a viewer asks the real relay for its
clock and reports its playback; ``/api/streams`` sums the reports up, and the real
publisher process shows the relay's summary in its status line.  Across relays, an edge
passes its viewers' reports on to the origin and serves the origin's thumbnail."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.frames import OP_TEXT, FrameParser, client_frame
from tests.support.http import http_get, http_json
from tests.support.publisher_process import light_encode, running_publisher
from tests.support.raw_ws import ws_open
from tests.support.relay_process import StartRelay
from tests.support.tokens import write_secret
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.publisher_process, pytest.mark.timeout(90)]


def test_reports_reach_the_listing_and_the_publishers_status_line(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """The relay answers a time request with its wall clock; two reports (2 s apart, as
    the rate allows) show in /api/streams; the publisher's status line (not a terminal:
    a line every 5 s) then shows the latency the viewers report."""
    relay = start_relay()
    log_path = tmp_path / "publisher.log"
    with running_publisher(
        f"{relay.ws_url}/publish/rep", *light_encode("320x180", 15, "300k"), log=log_path
    ):
        wait_until(
            lambda: any(s["live"] for s in http_json(relay.http_url, "/api/streams")["streams"]),
            30, 0.2,
        )
        viewer, response = ws_open(relay.port, "/watch/rep")
        assert response.status == 101
        parser = FrameParser()
        parser.feed(response.rest)
        before = time.time()
        viewer.sendall(client_frame(OP_TEXT, b'{"type":"time","t0":42.5}'))
        viewer.settimeout(10)
        answer = None
        while answer is None:
            for frame in parser.feed(viewer.recv(1 << 16)):
                if frame.opcode == OP_TEXT and json.loads(frame.payload)["type"] == "time":
                    answer = json.loads(frame.payload)
        assert answer["t0"] == 42.5
        assert before - 1 <= answer["server_us"] / 1e6 <= time.time() + 1
        for latency in (150.0, 250.0):
            report = {"type": "report", "latency_ms": latency, "fps": 15, "dropped": 0,
                      "stalls": 1, "clock_offset_ms": 0.5}
            viewer.sendall(client_frame(OP_TEXT, json.dumps(report).encode()))
            time.sleep(2.1)
        entry = http_json(relay.http_url, "/api/streams")["streams"][0]
        summary = entry["viewer_reports"]
        assert summary["reports"] == 2 and summary["stalls"] == 2
        assert summary["latency_ms"] == {"p50": 150.0, "p95": 250.0}

        def status_shows_it() -> bool:
            return "latency p50 150 ms p95 250 ms, 2 stalls" in log_path.read_text()

        wait_until(status_shows_it, 20, 0.5)
        viewer.close()


def test_an_edges_viewers_reach_the_origin_and_the_edge_serves_the_thumbnail(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """Origin and edge as real relays (``--upstream``): the real publisher on the origin,
    a viewer on the edge that reports; the edge serves the publisher's thumbnail and
    counts the report, and passes it on so the origin counts it too."""
    secret = write_secret(tmp_path, "relay.key", b"reports-chain-relay-secret")
    origin = start_relay("--relay-secret-file", str(secret))
    edge = start_relay("--relay-secret-file", str(secret), "--upstream", origin.ws_url)
    log_path = tmp_path / "publisher.log"
    with running_publisher(
        f"{origin.ws_url}/publish/far", "--quiet", *light_encode("320x180", 15, "300k"),
        "--thumbnail-interval", "1", log=log_path,
    ):
        viewer, response = ws_open(edge.port, "/watch/far")
        assert response.status == 101

        def edge_thumbnail() -> bytes | None:
            answer = http_get(edge.http_url, "/api/streams/far/thumbnail.jpg")
            return answer.body if answer.status == 200 else None

        assert wait_until(edge_thumbnail, 30, 0.3).startswith(b"\xff\xd8\xff")
        report = {"type": "report", "latency_ms": 321.0, "fps": 15, "dropped": 0,
                  "stalls": 0, "clock_offset_ms": None}
        viewer.sendall(client_frame(OP_TEXT, json.dumps(report).encode()))

        def reports_at(relay_url: str) -> int:
            for entry in http_json(relay_url, "/api/streams")["streams"]:
                if entry["name"] == "far":
                    return int(entry["viewer_reports"]["reports"])
            return 0

        wait_until(lambda: reports_at(edge.http_url) == 1, 10, 0.2)
        wait_until(lambda: reports_at(origin.http_url) == 1, 20, 0.3)
        entry = next(e for e in http_json(origin.http_url, "/api/streams")["streams"]
                     if e["name"] == "far")
        assert entry["viewer_reports"]["latency_ms"] == {"p50": 321.0, "p95": 321.0}
        viewer.close()
