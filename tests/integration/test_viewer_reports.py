"""Viewer reports end to end over real sockets: a viewer asks the real relay for its
clock and reports its playback; ``/api/streams`` sums the reports up, and the real
publisher process shows the relay's summary in its status line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.frames import OP_TEXT, FrameParser, client_frame
from tests.support.http import http_json
from tests.support.raw_ws import ws_open
from tests.support.relay_process import StartRelay
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


def test_reports_reach_the_listing_and_the_publishers_status_line(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """The relay answers a time request with its wall clock; two reports (2 s apart, as
    the rate allows) show in /api/streams; the publisher's status line (not a terminal:
    a line every 5 s) then shows the latency the viewers report."""
    relay = start_relay()
    log_path = tmp_path / "publisher.log"
    with open(log_path, "ab") as log:
        publisher = subprocess.Popen(
            [sys.executable, "-m", "streamrelay.publisher", f"{relay.ws_url}/publish/rep",
             "--size", "320x180", "--fps", "15", "--preset", "ultrafast", "--bitrate", "300k"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
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
    finally:
        publisher.send_signal(signal.SIGTERM)
        try:
            publisher.wait(15)
        except subprocess.TimeoutExpired:
            publisher.kill()
            publisher.wait()
