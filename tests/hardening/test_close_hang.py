"""Hardening 5: close hang.

A peer that stops reading (a receive buffer of 1 KiB set before connecting, and no
``recv`` ever again) after the relay starts a closing handshake must be gone, on the
relay's side, within ``--close-timeout`` + 1 s of the start of that close. "Gone" is
read from ``/api/internals``: the relay's set of open connections (a channel leaves it
in ``connectionLost``).

- publisher idle: a publisher that sends nothing is closed (1008) after
  ``--publisher-idle-timeout 1``; it never answers (``--close-timeout 1``);
- stuck viewer: a viewer that stopped reading while a publisher floods it (the relay has
  megabytes pending towards it, so no close frame can even be written) then sends a text
  frame that is not UTF-8 (the relay fails the connection, 1007), a binary frame (the
  relay closes it, 1003) or a close frame of its own (the peer starts the close);
- viewer stall: the same stuck viewer, closed by ``--viewer-stall-timeout 1`` (1008);
- shutdown: SIGTERM while that stuck viewer is connected: the process exits within
  ``--close-timeout`` + 1 s.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.support.figures import record_figure, rounded
from tests.support.frames import OP_BINARY, OP_TEXT, client_frame, close_frame
from tests.support.media import CONFIG, KEY, media_message
from tests.support.raw_ws import ws_open
from tests.support.relay_api import api_internals
from tests.support.relay_process import RelayProcess, StartRelay

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

CLOSE_TIMEOUT = 1.0
TINY_BUFFER = 1024


def _connections(relay: RelayProcess) -> int:
    """Open connections on the relay, not counting the request asking."""
    return int(api_internals(relay)["connections"]) - 1


def _wait_for_connections(relay: RelayProcess, count: int, timeout: float) -> float | None:
    """Poll until the relay holds ``count`` connections; the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _connections(relay) == count:
            return time.monotonic()
        time.sleep(0.02)
    return None


class Flooder:
    """A raw publisher sending 64 KiB KEY messages as fast as the relay reads them."""

    def __init__(self, port: int, stream: str) -> None:
        self.sock, response = ws_open(port, f"/publish/{stream}")
        assert response.status == 101, response
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        frame_config = client_frame(OP_BINARY, media_message(0, CONFIG, 64))
        with contextlib.suppress(OSError):
            self.sock.sendall(frame_config)
            sequence = 1
            while not self._stop.is_set():
                self.sock.sendall(client_frame(OP_BINARY, media_message(sequence, KEY, 65536)))
                self.sent += 1
                sequence += 1
                time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()


def _stuck_viewer(port: int, stream: str) -> socket.socket:
    sock, response = ws_open(port, f"/watch/{stream}", rcvbuf=TINY_BUFFER)
    assert response.status == 101, response
    return sock


def _wait_backlog(relay: RelayProcess, minimum: int, timeout: float = 10.0) -> int:
    """Wait until the relay holds at least ``minimum`` bytes pending towards viewers."""
    deadline = time.monotonic() + timeout
    backlog = 0
    while time.monotonic() < deadline:
        backlog = int(api_internals(relay)["buffered_bytes"])
        if backlog >= minimum:
            return backlog
        time.sleep(0.05)
    return backlog


def test_close_hang_idle_publisher(start_relay: StartRelay) -> None:
    """A silent publisher closed for idleness, that never answers the close, is gone within
    ``--close-timeout`` + 1 s of the start of the close."""
    idle = 1.0
    relay = start_relay(
        "--publisher-idle-timeout", str(idle), "--close-timeout", str(CLOSE_TIMEOUT), internals=True
    )
    sock, response = ws_open(relay.port, "/publish/idle", rcvbuf=TINY_BUFFER)
    opened = time.monotonic()
    assert response.status == 101
    try:
        gone = _wait_for_connections(relay, 0, timeout=idle + CLOSE_TIMEOUT + 5)
    finally:
        sock.close()
    close_started = opened + idle  # the idle close starts no earlier than this
    after_close = None if gone is None else gone - close_started
    record_figure(
        "close_hang_idle_publisher",
        publisher_idle_timeout_s=idle,
        close_timeout_s=CLOSE_TIMEOUT,
        bound_s=CLOSE_TIMEOUT + 1,
        gone_after_open_s=None if gone is None else rounded(gone - opened),
        gone_after_close_start_s=None if after_close is None else rounded(after_close),
    )
    assert after_close is not None and after_close <= CLOSE_TIMEOUT + 1


VIEWER_TRIGGERS = {
    # the relay fails the connection (Autobahn's path): text that is not UTF-8
    "invalid_utf8_1007": client_frame(OP_TEXT, b"\xff\xfe not UTF-8"),
    # the relay closes it (the relay's own path): viewers may not send binary
    "binary_1003": client_frame(OP_BINARY, b"binary from a viewer"),
    # the peer starts the close itself, then reads nothing
    "peer_close_1000": close_frame(1000),
}


@pytest.mark.parametrize("trigger", sorted(VIEWER_TRIGGERS))
def test_close_hang_viewer_with_megabytes_pending(start_relay: StartRelay, trigger: str) -> None:
    """A stuck viewer with megabytes pending towards it is gone within ``--close-timeout``
    + 1 s of its trigger (invalid UTF-8, binary from a viewer, or its own close frame)."""
    relay = start_relay(
        "--close-timeout", str(CLOSE_TIMEOUT), "--viewer-stall-timeout", "60", internals=True
    )
    viewer = _stuck_viewer(relay.port, "flood")
    flooder = Flooder(relay.port, "flood")
    try:
        backlog = _wait_backlog(relay, 1024 * 1024)
        before = _connections(relay)
        started = time.monotonic()
        viewer.sendall(VIEWER_TRIGGERS[trigger])
        gone = _wait_for_connections(relay, before - 1, timeout=CLOSE_TIMEOUT + 5)
    finally:
        flooder.stop()
        viewer.close()
    after_close = None if gone is None else gone - started
    record_figure(
        f"close_hang_viewer_{trigger}",
        close_timeout_s=CLOSE_TIMEOUT,
        bound_s=CLOSE_TIMEOUT + 1,
        pending_towards_viewers_bytes=backlog,
        publisher_messages_sent=flooder.sent,
        gone_after_trigger_s=None if after_close is None else rounded(after_close),
    )
    assert backlog >= 1024 * 1024, "the relay never had data pending towards the viewer"
    assert after_close is not None and after_close <= CLOSE_TIMEOUT + 1


def test_close_hang_stalled_viewer_and_shutdown(start_relay: StartRelay) -> None:
    """A stalled viewer is closed by ``--viewer-stall-timeout`` and gone in time; SIGTERM with
    another stuck viewer connected exits within ``--close-timeout`` + 1.5 s."""
    stall = 1.0
    relay = start_relay(
        "--close-timeout", str(CLOSE_TIMEOUT), "--viewer-stall-timeout", str(stall), internals=True
    )
    viewer = _stuck_viewer(relay.port, "stall")
    flooder = Flooder(relay.port, "stall")
    try:
        backlog = _wait_backlog(relay, 1024 * 1024)
        seen_backlog = time.monotonic()  # the stall clock started before this
        before = _connections(relay)
        gone = _wait_for_connections(relay, before - 1, timeout=stall + CLOSE_TIMEOUT + 5)
        stall_gone = None if gone is None else gone - seen_backlog
        # Shutdown with a second stuck viewer: 1001, then aborted after the close timeout.
        second = _stuck_viewer(relay.port, "stall")
        _wait_backlog(relay, 1024 * 1024)
        stop_started = time.monotonic()
        status = relay.stop(timeout=CLOSE_TIMEOUT + 10)
        stop_seconds = time.monotonic() - stop_started
        second.close()
    finally:
        flooder.stop()
        viewer.close()
    record_figure(
        "close_hang_stalled_viewer_and_shutdown",
        viewer_stall_timeout_s=stall,
        close_timeout_s=CLOSE_TIMEOUT,
        pending_towards_viewers_bytes=backlog,
        stalled_viewer_gone_after_backlog_seen_s=None
        if stall_gone is None
        else rounded(stall_gone),
        stalled_bound_s=stall + CLOSE_TIMEOUT + 1,
        shutdown_seconds=rounded(stop_seconds),
        shutdown_bound_s=CLOSE_TIMEOUT + 1,
        exit_status=status,
    )
    assert stall_gone is not None and stall_gone <= stall + CLOSE_TIMEOUT + 1
    assert status in (-15, 143)
    assert stop_seconds <= CLOSE_TIMEOUT + 1.5
